"""SVHN (the cropped-digits format, 32x32) through torchvision's own dataset class.

Files are ``train_32x32.mat`` and ``test_32x32.mat`` from http://ufldl.stanford.edu/housenumbers/,
read from ``<data_dir>/svhn/`` (or from ``<data_dir>`` itself when it holds them); torchvision
checks their MD5 and maps the label 10 to the digit 0. ``--download`` fetches them into
``<data_dir>/svhn/``. The images are held in memory as N x 32 x 32 x 3 uint8, as CIFAR's are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from errors import UserError

from .images import ArrayImages, Source

FOLDER = "svhn"
CLASSES = [str(d) for d in range(10)]


def svhn_root(data_dir: str | Path) -> Path:
    """``DATA_DIR/svhn``, or ``DATA_DIR`` itself when it holds the .mat files."""
    from torchvision.datasets import SVHN

    data_dir = Path(data_dir)
    held = any((data_dir / entry[1]).is_file() for entry in SVHN.split_list.values())
    return data_dir if held else data_dir / FOLDER


def open_svhn(data_dir: str, download: bool = False) -> Source:
    root = svhn_root(data_dir)

    def make(train: bool, transform) -> ArrayImages:
        return _split(root, "train" if train else "test", download, transform)

    return Source("svhn", 10, (3, 32, 32), make)


def _split(root: Path, split: str, download: bool, transform) -> ArrayImages:
    from torchvision.datasets import SVHN

    url, filename, _ = SVHN.split_list[split]
    path = root / filename
    if not download and not path.is_file():
        raise UserError(f"svhn not found: expected {path}; pass --data-dir <folder that contains {FOLDER}/{filename} "
                        f"or {filename}> or add --download to fetch it (needs internet)")
    try:
        ds = SVHN(str(root), split=split, download=download)
    except RuntimeError:  # torchvision's MD5 check
        raise UserError(f"{path} is incomplete or corrupted (MD5 check failed): delete it and run again with "
                        "--download, or point --data-dir to a good copy") from None
    except OSError as e:  # URLError is an OSError
        raise UserError(f"could not download svhn into {root} ({type(e).__name__}: {e}); fetch {url} by hand "
                        f"into {root}") from None
    images = np.ascontiguousarray(np.transpose(ds.data, (0, 2, 3, 1)))  # torchvision keeps N x C x H x W
    return ArrayImages(images, ds.labels.tolist(), CLASSES, transform)
