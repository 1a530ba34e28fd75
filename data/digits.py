"""The embedded dataset: scikit-learn's bundled 8x8 handwritten digits, upsampled to 32x32x3.

No download is needed. The array layout mirrors torchvision's CIFAR datasets (``data`` is
N x 32 x 32 x 3 uint8, ``targets`` a list of ints, items are PIL images passed through
``transform``), so every transform and loader works unchanged on both.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

N_TEST = 360  # fixed 80/20 split of the 1797 images
SPLIT_SEED = 0


def _load_all() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # N,1,8,8 in [0,1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = (x * 255).round().to(torch.uint8).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).contiguous()
    return x.numpy(), bunch.target.astype(np.int64)


class Digits(Dataset):
    """Digits as a 10-class, 32x32 RGB dataset with a fixed train/test split (1437 / 360)."""

    classes = [str(i) for i in range(10)]

    def __init__(self, train: bool = True, transform: Optional[Callable] = None) -> None:
        images, labels = _load_all()
        order = np.random.RandomState(SPLIT_SEED).permutation(len(labels))
        idx = order[N_TEST:] if train else order[:N_TEST]
        self.data = images[idx]
        self.targets = labels[idx].tolist()
        self.train = train
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.data[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


def open_digits(data_dir: str = "", download: bool = False):
    """The registry's opener (nothing to read under ``data_dir``, nothing to download)."""
    from .images import Source

    return Source("digits", 10, (3, 32, 32), lambda train, transform: Digits(train=train, transform=transform))
