"""Torch state files: atomic save and safe load (``weights_only=True``, never running pickled code).

A state is one dict of tensors and plain Python values. Saving goes through
:func:`core.files.atomic_write`; loading refuses files that would need arbitrary pickled objects.
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from errors import UserError

from .files import atomic_write

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNSAFE_DETAIL = re.compile(r"Unsupported (?:global: GLOBAL [\w.]+|operand \d+|[a-z]+: [\w.]+)")


class CheckpointUnreadable(UserError):
    """The file is truncated, corrupted or not a PyTorch checkpoint."""


class UnsafeCheckpoint(UserError):
    """Loading the file would need arbitrary pickled objects (which can run code)."""


def write_failure(path: Path, err: OSError, kept: str = "the previous checkpoint is kept") -> UserError:
    """The one-line error for a checkpoint (or log) that could not be written; ``kept`` says what is safe."""
    reason = err.strerror or str(err)
    hint = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions"
    return UserError(f"cannot write {path}: {reason} (errno {err.errno}); {kept}. "
                     f"{hint.capitalize()}, then continue with --resume")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`core.files.atomic_write`).

    A failed write (disk full, permissions) removes its temp file and raises ``UserError``.
    """
    path = Path(path)
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise write_failure(path, e) from None


def _first_sentence(text: str, limit: int = 160) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    return lines[0].split(". ")[0].rstrip(".")[:limit] if lines else ""


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; refuse files that need arbitrary pickles.

    Raises ``UnsafeCheckpoint`` (nothing in the file is executed) or ``CheckpointUnreadable``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (pass a run folder or an existing .pt file)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSAFE_DETAIL.search(_ANSI.sub("", str(e)))
        detail = found.group(0) if found else _first_sentence(str(e))
        raise UnsafeCheckpoint(
            f"refusing to load {path}: it needs arbitrary pickled objects, which could run code ({detail}); "
            "only load files you trust, re-saved as a plain dict of tensors (model.state_dict())") from None
    except torch.OutOfMemoryError:  # a RuntimeError, but not the file's fault
        raise
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as e:
        raise CheckpointUnreadable(f"cannot read checkpoint {path}: {_first_sentence(str(e)) or type(e).__name__} "
                                   "(the file is truncated or not a PyTorch checkpoint)") from None
