"""Two kinds of image set and the opened-data-set record the registry hands out.

:class:`ArrayImages` holds its images in memory as N x H x W x C uint8 (``data``, as torchvision's
CIFAR classes do, so the evaluation reads them without a PIL round trip); :class:`FileImages`
reads image files on access (Tiny-ImageNet, ``folder:``), so a large set costs no memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


@dataclass(frozen=True)
class Source:
    """An opened data set (:class:`data.registry.DatasetSource`); ``make(train, transform)`` builds a split."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    make: Callable[[bool, Optional[Callable]], Dataset]

    def split(self, train: bool, transform: Optional[Callable] = None) -> Dataset:
        return self.make(train, transform)


class ArrayImages(Dataset):
    """Images in memory: ``data`` N x H x W x C uint8 (C = 1 or 3), ``targets`` a list of ints."""

    def __init__(self, data: np.ndarray, targets: Sequence[int], classes: Sequence[str],
                 transform: Optional[Callable] = None) -> None:
        self.data, self.targets, self.classes = data, [int(t) for t in targets], list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        pixels = self.data[i]
        img = Image.fromarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels)
        return (self.transform(img) if self.transform is not None else img), self.targets[i]


class FileImages(Dataset):
    """Image files read on access as RGB; a file of another size than ``size`` (H, W) is resized to it."""

    def __init__(self, files: Sequence[str | Path], targets: Sequence[int], classes: Sequence[str],
                 size: tuple[int, int], transform: Optional[Callable] = None) -> None:
        self.files, self.targets, self.classes = [str(f) for f in files], [int(t) for t in targets], list(classes)
        self.size, self.transform = size, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        with Image.open(self.files[i]) as f:
            img = f.convert("RGB")
        if img.size != (self.size[1], self.size[0]):  # PIL sizes are (W, H)
            img = img.resize((self.size[1], self.size[0]), Image.BILINEAR)
        return (self.transform(img) if self.transform is not None else img), self.targets[i]


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, read from its header."""
    with Image.open(path) as f:
        return f.size[1], f.size[0]
