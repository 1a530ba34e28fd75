"""``npz:PATH``: a user's own data set as one NumPy ``.npz`` file.

The file holds four arrays: ``x_train`` and ``x_test``, uint8 images N x H x W x C (C = 3 for
colour, 1 or a missing last axis for grey), and ``y_train`` and ``y_test``, integer labels
0..K-1. Both splits share H, W and C. The class count K is the largest label plus one, or the
length of an optional fifth array ``classes`` (the class names), which a set needs when its last
classes have no image. The file is read once, into memory; every problem with it is one
``UserError`` line.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from errors import UserError

from .images import ArrayImages, Source

KEYS = ("x_train", "y_train", "x_test", "y_test")
LAYOUT = "arrays x_train, y_train, x_test, y_test (uint8 N x H x W x C images, integer labels)"


def open_npz(path: str, download: bool = False) -> Source:
    """Read and check ``path``; the splits share its arrays."""
    where = f"npz:{path}"
    arrays = _read(Path(path), where)
    x = {s: _images(arrays[f"x_{s}"], f"{where}: x_{s}") for s in ("train", "test")}
    y = {s: _labels(arrays[f"y_{s}"], f"{where}: y_{s}") for s in ("train", "test")}
    for s in ("train", "test"):
        if len(x[s]) != len(y[s]):
            raise UserError(f"{where}: x_{s} holds {len(x[s])} images but y_{s} {len(y[s])} labels: "
                            "one label per image")
        if not len(y[s]):
            raise UserError(f"{where}: the {s} split is empty")
    if x["train"].shape[1:] != x["test"].shape[1:]:
        raise UserError(f"{where}: x_train images are {_hwc(x['train'])} but x_test images {_hwc(x['test'])}: "
                        "both splits need one image shape")
    classes = _class_names(arrays.get("classes"), int(max(y["train"].max(), y["test"].max())) + 1, where)
    num_classes = len(classes)
    h, w, c = x["train"].shape[1:]
    return Source(where, num_classes, (c, h, w),
                  lambda train, transform: ArrayImages(x["train" if train else "test"], y["train" if train else "test"],
                                                       classes, transform))


def _read(path: Path, where: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"{where}: no such file (pass --dataset npz:PATH with a .npz holding {LAYOUT})")
    with open(path, "rb") as f:
        head = f.read(6)
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):  # a zip archive, or a single .npy
        raise UserError(f"{where} is not a .npz archive (no zip file): write it with numpy.savez(PATH, x_train=..., "
                        "y_train=..., x_test=..., y_test=...)")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{where} is a single .npy array, not a .npz archive of {LAYOUT} (np.savez)")
        with loaded as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise UserError(f"{where} lacks {', '.join(missing)}: it needs {LAYOUT} (it has: "
                                f"{', '.join(f.files) or 'nothing'})")
            return {k: f[k] for k in (*KEYS, "classes") if k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{where} is not a readable .npz archive ({reason}): write it with "
                        f"numpy.savez(PATH, x_train=..., y_train=..., x_test=..., y_test=...)") from None


def _images(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise UserError(f"{what} is {x.dtype}, not uint8: store images as 0..255 uint8 N x H x W x C "
                        "(e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])")
    if x.ndim == 3:  # N x H x W: grey
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{what} has shape {x.shape}: expected N x H x W x C with C = 3 (colour) or 1 (grey), "
                        "channels last")
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, what: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{what} is {y.dtype} of shape {y.shape}: labels must be one integer per image "
                        "(class indices 0..K-1)")
    if len(y) and y.min() < 0:
        raise UserError(f"{what} holds the negative label {int(y.min())}: labels are class indices 0..K-1")
    return y.astype(np.int64)


def _class_names(names: Optional[np.ndarray], needed: int, where: str) -> list[str]:
    """The names in ``classes`` (at least one per label), else ``0..needed-1``."""
    if names is None:
        return [str(k) for k in range(needed)]
    if names.ndim != 1 or len(names) < needed:
        raise UserError(f"{where}: classes holds {names.size} name(s) but the labels go up to {needed - 1}: one "
                        "name per class, in label order")
    return [str(n) for n in names.tolist()]


def _hwc(x: np.ndarray) -> str:
    return "x".join(str(d) for d in x.shape[1:])
