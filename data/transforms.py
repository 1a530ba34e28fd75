"""Image transforms shared by every dataset (inputs stay in [0, 1]; no normalisation here).

``autoaug`` is two-view: each image yields ``(basic_view, autoaug_view)``, both float tensors in
[0, 1] drawn independently from the same PIL image. The AutoAugment view follows the released
GKL-AT code (``transform_aug_autoaug``): random crop (4 px padding) + horizontal flip, then the
CIFAR-10 AutoAugment policy. The released code used the DeepVoltaire ``CIFAR10Policy``, whose
geometric ops fill uncovered pixels with grey (128, 128, 128); torchvision's ``AutoAugment`` with
``AutoAugmentPolicy.CIFAR10`` implements the same 25 sub-policies, and ``fill=128`` keeps the grey.
With PyTorch's default collation a batch of pairs becomes ``[x_basic, x_aug], y``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torchvision.transforms as T
from PIL import Image

AUGMENTATIONS = ("none", "crop", "basic", "autoaug")
AUTOAUG_FILL = [128, 128, 128]


def eval_transform() -> Callable:
    """PIL image -> float tensor in [0, 1]."""
    return T.ToTensor()


def basic_transform(flip: bool = True, size: tuple[int, int] = (32, 32)) -> Callable:
    """Random crop of ``size`` (H, W) with 4 px zero padding (+ horizontal flip): the standard CIFAR augmentation."""
    ops = [T.RandomCrop(tuple(size), padding=4)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose(ops + [T.ToTensor()])


def autoaug_transform(flip: bool = True, size: tuple[int, int] = (32, 32)) -> Callable:
    """Crop (+ flip), then AutoAugment with the CIFAR-10 policy, then to a [0, 1] tensor."""
    ops = [T.RandomCrop(tuple(size), padding=4)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    ops.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10, fill=AUTOAUG_FILL))
    return T.Compose(ops + [T.ToTensor()])


class TwoViewTransform:
    """Applies two transforms to the same image and returns both results as a tuple."""

    def __init__(self, first: Callable, second: Callable) -> None:
        self.first, self.second = first, second

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(img), self.second(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n  first={self.first!r},\n  second={self.second!r})"


def two_view_transform(flip: bool = True, size: tuple[int, int] = (32, 32)) -> TwoViewTransform:
    """``(basic view, AutoAugment view)`` of one image, the input of the ``autoaug`` presets."""
    return TwoViewTransform(basic_transform(flip, size), autoaug_transform(flip, size))


def train_transform(augment: str, size: tuple[int, int] = (32, 32)) -> Callable:
    """Training transform for images of ``size`` (H, W): ``none``, ``crop`` (no flip: digits), ``basic``, or
    two-view ``autoaug``."""
    if augment == "none":
        return eval_transform()
    if augment == "crop":
        return basic_transform(flip=False, size=size)
    if augment == "basic":
        return basic_transform(flip=True, size=size)
    if augment == "autoaug":
        return two_view_transform(flip=True, size=size)
    raise ValueError(f"unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}")

