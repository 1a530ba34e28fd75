"""CIFAR-10 / CIFAR-100 through torchvision's own dataset classes.

Files are read from ``<data_dir>/cifar-10-batches-py/`` or ``<data_dir>/cifar-100-python/`` (the
"python version" archives from https://www.cs.toronto.edu/~kriz/cifar.html, extracted). Nothing is
downloaded unless ``download=True`` (``--download``). Every failure a user can cause (folder
missing, files corrupted, download impossible) becomes one ``UserError`` line naming the layout
and the flag that fixes it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from torchvision.datasets import CIFAR10, CIFAR100

from errors import UserError

CIFAR_CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}
_FILES = {
    "cifar10": "data_batch_1..5, test_batch, batches.meta",
    "cifar100": "train, test, meta",
}


def cifar_folder(name: str, data_dir: str | os.PathLike) -> Path:
    """The folder torchvision reads for ``name`` under ``data_dir``."""
    return Path(data_dir).expanduser() / CIFAR_CLASSES[name].base_folder


def cifar_dataset(name: str, train: bool, data_dir: str | os.PathLike = "./datasets", download: bool = False,
                  transform: Optional[Callable] = None) -> CIFAR10:
    """Train or test split of ``cifar10`` / ``cifar100`` as the torchvision dataset (``data``, ``targets``)."""
    if name not in CIFAR_CLASSES:
        raise KeyError(f"unknown CIFAR dataset {name!r}; choose one of: {', '.join(CIFAR_CLASSES)}")
    cls = CIFAR_CLASSES[name]
    root = _resolve_root(name, Path(data_dir).expanduser())
    folder = cifar_folder(name, root)
    if not download and not _all_files_present(name, root):
        raise UserError(
            f"{name} not found: expected {folder}{os.sep} holding {_FILES[name]}; pass --data-dir <folder that "
            f"contains {cls.base_folder}/> or add --download to fetch it (needs internet)")
    try:
        return cls(root=str(root), train=train, transform=transform, download=download)
    except RuntimeError:  # torchvision's MD5 checks of the files or of the downloaded archive
        raise UserError(
            f"{name} files in {folder} are incomplete or corrupted (MD5 check failed): delete that folder and "
            f"run again with --download, or point --data-dir to a good copy") from None
    except OSError as e:  # URLError is an OSError
        action = f"download {name} into {root}" if download else f"read {folder}"
        raise UserError(
            f"could not {action} ({type(e).__name__}: {e}); check the path and network, or fetch {cls.url} by "
            f"hand and extract it into {root}") from None


def _resolve_root(name: str, root: Path) -> Path:
    """Accept ``--data-dir`` pointing at the CIFAR folder itself as well as at its parent."""
    base = CIFAR_CLASSES[name].base_folder
    if root.name == base and not (root / base).exists():
        return root.parent
    return root


def _all_files_present(name: str, root: Path) -> bool:
    cls = CIFAR_CLASSES[name]
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return all((cifar_folder(name, root) / f).is_file() for f in names)


def open_cifar(name: str, data_dir: str, download: bool = False):
    """The registry's opener of ``cifar10`` / ``cifar100`` under ``data_dir``."""
    from .images import Source

    def make(train: bool, transform: Optional[Callable]) -> CIFAR10:
        return cifar_dataset(name, train=train, data_dir=data_dir, download=download, transform=transform)

    return Source(name, {"cifar10": 10, "cifar100": 100}[name], (3, 32, 32), make)
