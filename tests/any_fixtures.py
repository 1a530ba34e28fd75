"""Tiny data sets in the real on-disk formats, and a user's own network in a .py file, written by the tests.

- SVHN: ``train_32x32.mat`` / ``test_32x32.mat`` as MATLAB files (``X`` 32 x 32 x 3 x N uint8, ``y``
  N x 1 with 10 for the digit 0), written with ``scipy.io.savemat``. torchvision checks their MD5
  against the real files'; :func:`use_svhn_checksums` swaps the expected sums for those of the
  files written (the check itself still runs, as ``tests/cifar_fixture.py`` does for CIFAR).
- Tiny-ImageNet: ``tiny-imagenet-200/`` with ``wnids.txt`` (200 ids), ``words.txt``,
  ``train/<wnid>/images/<wnid>_<i>.JPEG`` plus ``<wnid>_boxes.txt``, ``val/images/val_<i>.JPEG``
  with ``val/val_annotations.txt`` and an unlabelled ``test/images/``.
- ``folder:``: ``train/<class>/*.png`` and ``test/<class>/*.png``; ``npz:``: ``np.savez`` arrays.
"""
from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

USER_NET = textwrap.dedent('''
    """A user's own network, as someone outside this project would write it."""
    import torch
    import torch.nn as nn


    class TwoConv(nn.Module):
        def __init__(self, num_classes: int = 10, width: int = 8, channels: int = 3) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Linear(2 * width, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))


    def make(num_classes: int = 10, width: int = 8, channels: int = 3) -> nn.Module:
        return TwoConv(num_classes, width, channels)


    class Wrapped(nn.Module):
        """A wrapper whose only child is called ``model``: every key of its state dict starts with ``model.``."""

        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.model = TwoConv(num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)


    def raising(num_classes: int = 10) -> nn.Module:
        raise RuntimeError("the factory could not build its network")


    def not_a_module(num_classes: int = 10):
        return {"weights": None}


    def seven_outputs() -> nn.Module:
        return TwoConv(num_classes=7)
''')


def write_user_net(folder: Path, name: str = "my_nets.py") -> Path:
    """The user's network file (``make``, ``Wrapped``, and the failing ``raising``, ``not_a_module``, ``seven_outputs``)."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(USER_NET)
    return path


def _images(labels: np.ndarray, size: tuple[int, int], rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """N x H x W x C uint8: a colour per class plus noise, so a tiny model could learn them."""
    palette = np.random.default_rng(1234).integers(30, 226, size=(int(labels.max()) + 1, channels))
    noise = rng.integers(-30, 31, size=(len(labels), *size, channels))
    return np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def write_npz(path: Path, n_train: int = 48, n_test: int = 16, num_classes: int = 4, size=(32, 32),
              seed: int = 0, **override: np.ndarray) -> Path:
    """``np.savez`` of x_train, y_train, x_test, y_test; ``override`` replaces (or adds) arrays."""
    rng = np.random.default_rng(seed)
    y_train, y_test = _labels(n_train, num_classes, rng), _labels(n_test, num_classes, rng)
    arrays = {"x_train": _images(y_train, size, rng), "y_train": y_train,
              "x_test": _images(y_test, size, rng), "y_test": y_test, **override}
    np.savez(path, **arrays)
    return Path(path)


def write_folder(root: Path, classes=("cat", "dog", "fox"), n_train: int = 8, n_test: int = 3, size=(40, 40),
                 seed: int = 0) -> dict[str, list[tuple[Path, int]]]:
    """``root/train/<class>/i.png`` and ``root/test/<class>/i.png``; returns (file, class index) per split."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[tuple[Path, int]]] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        written[split] = []
        (root / split).mkdir(parents=True, exist_ok=True)
        if n == 0:
            continue
        labels = np.repeat(np.arange(len(classes)), n)
        pixels = _images(labels, size, rng)
        for i, (label, image) in enumerate(zip(labels, pixels)):
            path = root / split / classes[label] / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            written[split].append((path, int(label)))
    return written


def write_svhn(root: Path, n_train: int = 30, n_test: int = 12, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/train_32x32.mat`` and ``root/test_32x32.mat``; returns each split's (N x 32 x 32 x 3, digits 0-9)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        digits = _labels(n, 10, rng)
        images = _images(digits, (32, 32), rng)
        mat_labels = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]  # SVHN writes 10 for the digit 0
        savemat(root / f"{split}_32x32.mat", {"X": np.transpose(images, (1, 2, 3, 0)), "y": mat_labels})
        written[split] = (images, digits)
    return written


def use_svhn_checksums(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make torchvision's SVHN expect the MD5 of the files written under ``root`` (its check still runs)."""
    from torchvision.datasets import SVHN

    table = {split: [url, name, hashlib.md5((root / name).read_bytes()).hexdigest()]
             for split, (url, name, _) in SVHN.split_list.items() if (root / name).is_file()}
    monkeypatch.setattr(SVHN, "split_list", {**SVHN.split_list, **table})


def write_tiny_imagenet(data_dir: Path, n_val: int = 12, seed: int = 0,
                        n_classes: int = 200) -> tuple[Path, list[str], list[tuple[str, str]]]:
    """The ``tiny-imagenet-200`` layout with one training image per class; returns (root, wnids in the
    order wnids.txt lists them, [(val file name, wnid)] in the order of val_annotations.txt)."""
    rng = np.random.default_rng(seed)
    root = data_dir / "tiny-imagenet-200"
    wnids = [f"n{int(v):08d}" for v in rng.choice(10**8, size=n_classes, replace=False)]
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    (root / "test" / "images").mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")  # not sorted, as in the real file
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    pixels = _images(np.arange(n_classes), (64, 64), rng)
    for wnid, image in zip(wnids, pixels):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{wnid}_0.JPEG", format="JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    val = [(f"val_{i}.JPEG", wnids[int(rng.integers(n_classes))]) for i in range(n_val)]
    val_pixels = _images(rng.integers(0, n_classes, size=n_val), (64, 64), rng)
    for (name, _), image in zip(val, val_pixels):
        Image.fromarray(image).save(root / "val" / "images" / name, format="JPEG")
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t1\t2\t60\t61\n" for n, w in val))
    Image.fromarray(val_pixels[0]).save(root / "test" / "images" / "test_0.JPEG", format="JPEG")
    return root, wnids, val


def tree_digest(folder: Path, skip: Optional[str] = None) -> dict[str, str]:
    """sha256 of every file under ``folder`` (paths relative), to show that nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and (skip is None or skip not in p.parts)}
