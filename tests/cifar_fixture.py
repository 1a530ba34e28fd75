"""A tiny CIFAR-10 / CIFAR-100 in the real on-disk format, read by torchvision's own classes.

``write_fake_cifar`` writes exactly the files of the "python version" archives (pickled dicts,
``data`` as N x 3072 uint8 rows in R, G, B plane order): ``data_batch_1..5``, ``test_batch``,
``batches.meta`` for CIFAR-10; ``train``, ``test``, ``meta`` (fine and coarse labels) for CIFAR-100.

torchvision verifies every file against the MD5 of the real archives (``_check_integrity`` and
``_load_meta``), which synthetic files cannot match. Rather than switching that check off,
``use_fake_checksums`` swaps the expected MD5s in the class attributes ``train_list``,
``test_list`` and ``meta`` for the MD5s of the files just written. The real code path runs
unchanged, MD5 checks included, so a corrupted fake file is still detected.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from torchvision.datasets import CIFAR10, CIFAR100

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N x 3072 uint8 rows: a colour per class plus noise, so a tiny model could learn them."""
    palette = np.random.default_rng(1234).integers(30, 226, size=(int(labels.max()) + 1, 3))
    base = palette[labels][:, :, None, None]  # N,3,1,1
    noise = rng.integers(-30, 31, size=(len(labels), 3, 32, 32))
    return np.clip(base + noise, 0, 255).astype(np.uint8).reshape(len(labels), 3 * 32 * 32)


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Every class present whenever n >= num_classes, in a shuffled order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the archives were written by Python 2's cPickle


def _write_cifar10(folder: Path, n_train: int, n_test: int, rng: np.random.Generator) -> None:
    labels = _labels(n_train, 10, rng)
    images = _images(labels, rng)
    for k, idx in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _dump(folder / f"data_batch_{k}", {
            "batch_label": f"training batch {k} of 5", "labels": labels[idx].tolist(), "data": images[idx],
            "filenames": [f"fake_{i:05d}.png" for i in idx]})
    test_labels = _labels(n_test, 10, rng)
    _dump(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": test_labels.tolist(), "data": _images(test_labels, rng),
        "filenames": [f"fake_test_{i:05d}.png" for i in range(n_test)]})
    _dump(folder / "batches.meta", {"num_cases_per_batch": -(-n_train // 5), "label_names": CIFAR10_NAMES,
                                     "num_vis": 3072})


def _write_cifar100(folder: Path, n_train: int, n_test: int, rng: np.random.Generator) -> None:
    for split, n in (("train", n_train), ("test", n_test)):
        fine = _labels(n, 100, rng)
        _dump(folder / split, {
            "filenames": [f"fake_{split}_{i:05d}.png" for i in range(n)], "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(), "data": _images(fine, rng)})
    _dump(folder / "meta", {"fine_label_names": [f"fine_{i:02d}" for i in range(100)],
                            "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)]})


def write_fake_cifar(root: str | Path, name: str = "cifar10", n_train: int = 50, n_test: int = 20,
                     seed: int = 0) -> Path:
    """Write a fake ``name`` under ``root`` in torchvision's layout; returns its folder."""
    if name not in _CLASSES:
        raise ValueError(f"name must be cifar10 or cifar100, got {name!r}")
    folder = Path(root) / _CLASSES[name].base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    (_write_cifar10 if name == "cifar10" else _write_cifar100)(folder, n_train, n_test, rng)
    return folder


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def use_fake_checksums(monkeypatch: pytest.MonkeyPatch, root: str | Path, name: str) -> None:
    """Make torchvision's MD5 checks of ``name`` expect the files now under ``root``."""
    cls = _CLASSES[name]
    folder = Path(root) / cls.base_folder
    monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, _md5(folder / f)] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})


FAKE_SIZES = {"cifar10": (50, 20), "cifar100": (200, 100)}


@pytest.fixture
def fake_cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder holding fake CIFAR-10 (50/20 images) and CIFAR-100 (200/100), readable as ``data_dir``."""
    for name, (n_train, n_test) in FAKE_SIZES.items():
        write_fake_cifar(tmp_path, name, n_train, n_test)
        use_fake_checksums(monkeypatch, tmp_path, name)
    yield tmp_path
