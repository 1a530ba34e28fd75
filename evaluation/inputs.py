"""The evaluated points: the first ``n_ex`` images of a dataset split, as tensors in [0, 1]."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from errors import UserError

SPLITS = ("test", "train")


def load_eval_data(dataset: str, split: str = "test", data_dir: str = "./datasets",
                   n_ex: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``n_ex`` (all when None) images of ``dataset``/``split`` as (N,3,H,W) float and labels.

    Taking the first points in file order, as RobustBench does, keeps evaluations comparable.
    """
    from data import DATASETS, build_dataset

    if dataset not in DATASETS:
        raise UserError(f"unknown --dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise UserError(f"--split {split!r} is not one of: {', '.join(SPLITS)}")
    if n_ex is not None and n_ex <= 0:
        raise UserError(f"--n-ex must be a positive number of images, got {n_ex}")
    try:
        ds = build_dataset(dataset, train=split == "train", data_dir=data_dir, download=False)
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot load {dataset} from {data_dir}: {str(e).splitlines()[0][:200]} "
                        "(pass --data-dir with the dataset in it)") from None
    n = len(ds) if n_ex is None else min(n_ex, len(ds))
    if hasattr(ds, "data") and hasattr(ds, "targets"):  # CIFAR-like: skip the per-image PIL round trip
        images = torch.from_numpy(np.ascontiguousarray(ds.data[:n])).permute(0, 3, 1, 2).float().div_(255)
        labels = torch.as_tensor(list(ds.targets[:n]), dtype=torch.long)
        return images.contiguous(), labels
    items = [ds[i] for i in range(n)]
    return torch.stack([img for img, _ in items]), torch.tensor([int(t) for _, t in items])


def points_identity(x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    """What identifies the evaluated points beyond dataset, split and n: digests of labels and pixels.

    Two reports may be paired point by point (``evaluation.compare``) only when these agree.
    """
    import hashlib

    labels = np.ascontiguousarray(y.detach().cpu().numpy().astype(np.int64))
    pixels = np.ascontiguousarray(x.detach().cpu().to(torch.float32).numpy())
    return {"n": int(len(y)), "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
            "images_sha256": hashlib.sha256(pixels.tobytes()).hexdigest()}
