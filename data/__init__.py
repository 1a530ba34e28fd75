"""Datasets (CIFAR-10/100, embedded digits, generated data), transforms and batch samplers.

All datasets yield ``(image, label)`` with images as float tensors in [0, 1] (or, in two-view
mode, a pair of such tensors) and share the torchvision CIFAR interface (``data``, ``targets``).
"""
from __future__ import annotations

from typing import Callable, Optional

from torch.utils.data import Dataset

from .digits import Digits
from .sampler import EpochBatchSampler, SeededDataset
from .transforms import AUGMENTATIONS, eval_transform, train_transform

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
DATASETS = tuple(NUM_CLASSES)


def build_dataset(name: str, train: bool, data_dir: str = "./datasets", download: bool = False,
                  transform: Optional[Callable] = None) -> Dataset:
    """Return the train or test split of ``name`` with ``transform`` (default: plain to-tensor)."""
    transform = transform or eval_transform()
    if name == "digits":
        return Digits(train=train, transform=transform)
    if name in ("cifar10", "cifar100"):
        from .cifar import cifar_dataset

        return cifar_dataset(name, train=train, data_dir=data_dir, download=download, transform=transform)
    raise KeyError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


__all__ = ["AUGMENTATIONS", "DATASETS", "NUM_CLASSES", "Digits", "EpochBatchSampler", "SeededDataset",
           "build_dataset", "eval_transform", "train_transform"]
