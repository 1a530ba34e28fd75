"""CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019) in the layout the archives ship in.

``DIR/CIFAR-10-C/`` (or ``CIFAR-100-C``) holds one ``<corruption>.npy`` per corruption with the five
severities stacked (``5 * m`` images of 32x32x3 uint8, severity ``s`` in rows ``(s - 1) * m`` to
``s * m``; m = 10,000 in the published data) and ``labels.npy`` with the ``5 * m`` labels. This is
the layout RobustBench's ``robustbench.data.load_cifar10c`` reads (it fixes m = 10,000; here m is
read from the files, so small test copies load through the same code). Files are memory-mapped:
a severity is read only as far as the first ``n`` images asked for. Nothing is ever downloaded;
a missing or malformed file is one ``UserError`` line naming the folder and where the data is
published.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from errors import UserError

from . import NUM_CLASSES

# RobustBench's order (robustbench.data.CORRUPTIONS), which its per-corruption tables follow.
CORRUPTIONS = ("shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur", "brightness",
               "fog", "zoom_blur", "frost", "glass_blur", "impulse_noise", "contrast", "jpeg_compression",
               "elastic_transform")
SEVERITIES = (1, 2, 3, 4, 5)
FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
SOURCES = {"cifar10": "https://zenodo.org/records/2535967", "cifar100": "https://zenodo.org/records/3555552"}
IMAGE_SHAPE = (32, 32, 3)


def corrupted_folder(dataset: str, data_dir: str | os.PathLike) -> Path:
    """``data_dir/CIFAR-10-C`` (or ``CIFAR-100-C``); ``data_dir`` may also be that folder itself."""
    root = Path(data_dir).expanduser()
    name = FOLDERS[dataset]
    return root if root.name == name and not (root / name).exists() else root / name


def fetch_hint(dataset: str, folder: Path) -> str:
    """Where the data is published and where it must go."""
    return (f"download {FOLDERS[dataset]}.tar (Hendrycks & Dietterich, {SOURCES[dataset]}) and extract it into "
            f"{folder.parent}, or pass the --data-dir that holds {FOLDERS[dataset]}/")


@dataclass
class CorruptedCifar:
    """The checked files of one corrupted test set; :meth:`open` validates before anything is read."""

    dataset: str
    folder: Path
    corruptions: tuple[str, ...]
    labels: np.ndarray  # (5 * per_severity,) int64
    per_severity: int

    @classmethod
    def open(cls, dataset: str, data_dir: str | os.PathLike,
             corruptions: Sequence[str] = CORRUPTIONS) -> "CorruptedCifar":
        """Check the folder, ``labels.npy`` and every ``<corruption>.npy`` (shape, dtype, length)."""
        if dataset not in FOLDERS:
            raise UserError(f"there is no corrupted test set for {dataset}: common corruptions need "
                            f"--dataset {' or '.join(FOLDERS)}")
        unknown = [c for c in corruptions if c not in CORRUPTIONS]
        if unknown or not corruptions:
            raise UserError(f"unknown corruption(s) {', '.join(unknown) or '(none)'}; choose from: "
                            f"{', '.join(CORRUPTIONS)}")
        folder = corrupted_folder(dataset, data_dir)
        if not folder.is_dir():
            raise UserError(f"no {FOLDERS[dataset]} folder at {folder}: {fetch_hint(dataset, folder)}")
        names = ["labels", *corruptions]
        missing = [f"{n}.npy" for n in names if not (folder / f"{n}.npy").is_file()]
        if missing:
            raise UserError(f"{folder} lacks {', '.join(missing)} ({len(missing)} of {len(names)} files): "
                            f"{fetch_hint(dataset, folder)}")
        labels = np.asarray(_load(folder / "labels.npy", dataset))
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0 or len(labels) % len(SEVERITIES):
            raise UserError(f"{folder / 'labels.npy'} holds {labels.dtype} of shape {labels.shape}, not one integer "
                            f"label per image for {len(SEVERITIES)} severities: {fetch_hint(dataset, folder)}")
        labels = labels.astype(np.int64)
        if labels.min() < 0 or labels.max() >= NUM_CLASSES[dataset]:
            raise UserError(f"{folder / 'labels.npy'} has labels outside 0..{NUM_CLASSES[dataset] - 1}: is this "
                            f"{FOLDERS[dataset]}? {fetch_hint(dataset, folder)}")
        for name in corruptions:
            images = _load(folder / f"{name}.npy", dataset)
            if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
                raise UserError(f"{folder / (name + '.npy')} holds {images.dtype} images of shape {images.shape[1:]},"
                                f" not {'x'.join(map(str, IMAGE_SHAPE))} uint8: {fetch_hint(dataset, folder)}")
            if len(images) != len(labels):
                raise UserError(f"{folder / (name + '.npy')} holds {len(images)} images but labels.npy "
                                f"{len(labels)} labels: the files come from different copies; "
                                f"{fetch_hint(dataset, folder)}")
        return cls(dataset, folder, tuple(corruptions), labels, len(labels) // len(SEVERITIES))

    def count(self, n: Optional[int] = None) -> int:
        """Images evaluated per (corruption, severity): the first ``n`` (all when None)."""
        return self.per_severity if n is None else min(int(n), self.per_severity)

    def severity(self, corruption: str, severity: int, n: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` images (N, 32, 32, 3 uint8, memory-mapped) of one severity, and their labels."""
        if corruption not in self.corruptions or severity not in SEVERITIES:
            raise KeyError(f"({corruption}, {severity}) is not in this set")
        start = (severity - 1) * self.per_severity
        stop = start + self.count(n)
        images = _load(self.folder / f"{corruption}.npy", self.dataset)
        return images[start:stop], self.labels[start:stop]

    def batches(self, corruption: str, severity: int, n: Optional[int] = None,
                batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` batches of one severity: float (B, 3, 32, 32) in [0, 1] (as RobustBench: /255) and labels."""
        images, labels = self.severity(corruption, severity, n)
        for i in range(0, len(labels), batch_size):
            chunk = np.array(images[i:i + batch_size])  # a copy: the memory map is read-only
            x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div_(255)
            yield x.contiguous(), torch.from_numpy(labels[i:i + batch_size].copy())


def _load(path: Path, dataset: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({str(e).splitlines()[0][:120]}): "
                        f"{fetch_hint(dataset, path.parent)}") from None
