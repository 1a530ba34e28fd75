"""Datasets (a registry: CIFAR-10/100, embedded digits, SVHN, Tiny-ImageNet, ``folder:PATH``, ``npz:PATH``;
generated data), transforms and batch samplers.

All datasets yield ``(image, label)`` with images as float tensors in [0, 1] (or, in two-view
mode, a pair of such tensors) and share the torchvision CIFAR interface (``targets``; ``data`` as
N x H x W x C uint8 where the images are held in memory). :mod:`data.registry` names them; the
names below are imported on first use, so that ``python -m data.convert_generated`` stays free
of torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from .registry import (DATASETS, ENTRIES, NUM_CLASSES, DatasetEntry, build_dataset, canonical_name, image_shape_of,
                       num_classes_of, open_dataset, register)

_LAZY = {"Digits": ".digits", "EpochBatchSampler": ".sampler", "SeededDataset": ".sampler",
         "AUGMENTATIONS": ".transforms", "eval_transform": ".transforms", "train_transform": ".transforms"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AUGMENTATIONS", "DATASETS", "ENTRIES", "NUM_CLASSES", "DatasetEntry", "Digits", "EpochBatchSampler",
           "SeededDataset", "build_dataset", "canonical_name", "eval_transform", "image_shape_of", "num_classes_of",
           "open_dataset", "register", "train_transform"]
