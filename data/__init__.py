"""Datasets (CIFAR-10/100, embedded digits, generated data), transforms and batch samplers.

All datasets yield ``(image, label)`` with images as float tensors in [0, 1] (or, in two-view
mode, a pair of such tensors) and share the torchvision CIFAR interface (``data``, ``targets``).
The names below are imported on first use, so that ``python -m data.convert_generated`` stays
free of torch.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}
DATASETS = tuple(NUM_CLASSES)
_LAZY = {"Digits": ".digits", "EpochBatchSampler": ".sampler", "SeededDataset": ".sampler",
         "AUGMENTATIONS": ".transforms", "eval_transform": ".transforms", "train_transform": ".transforms"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_dataset(name: str, train: bool, data_dir: str = "./datasets", download: bool = False,
                  transform: Optional[Callable] = None):
    """Return the train or test split of ``name`` with ``transform`` (default: plain to-tensor)."""
    from .transforms import eval_transform

    transform = transform or eval_transform()
    if name == "digits":
        from .digits import Digits

        return Digits(train=train, transform=transform)
    if name in ("cifar10", "cifar100"):
        from .cifar import cifar_dataset

        return cifar_dataset(name, train=train, data_dir=data_dir, download=download, transform=transform)
    raise KeyError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


__all__ = ["AUGMENTATIONS", "DATASETS", "NUM_CLASSES", "Digits", "EpochBatchSampler", "SeededDataset",
           "build_dataset", "eval_transform", "train_transform"]
