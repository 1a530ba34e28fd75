"""Torch state files: atomic save and safe load (``weights_only=True``, never running pickled code).

A state is one dict of tensors and plain Python values. Saving goes through
:func:`core.files.atomic_write`; loading refuses files that would need arbitrary pickled objects.
"""
from __future__ import annotations

import errno
import os
import pickle
import pickletools
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from errors import UserError

from .files import atomic_write

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch's weights_only unpickler names the global a file asks for in one of two forms:
# "Unsupported global: GLOBAL fractions.Fraction was not an allowed global ..." and
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")  # builtins come without a module: "GLOBAL open"
# Its other refusals of objects (they follow an allowed global, so random bytes never reach them).
_OBJECT_REFUSALS = ("Trying to call reduce", "Can only create new object", "Can only build",
                    "must be imported to load")
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # torch's pre-1.6 format
_PICKLE_PROTO = b"\x80"
_SAFE_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode")  # what torch's own files ask for


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


def _unsafe_detail(message: str) -> Optional[str]:
    """What a torch file asks for, when torch refused it for asking for objects; None otherwise."""
    text = _ANSI.sub("", message)
    found = _GLOBAL.search(text)
    if found:
        return f"the pickled global {found.group(1)}"
    for refusal in _OBJECT_REFUSALS:
        at = text.find(refusal)
        if at >= 0:
            return _first_sentence(text[at:])
    return None


def _pickled_globals(path: Path) -> list[str]:
    """The globals a raw pickle names, read with ``pickletools`` (which only parses, never builds)."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL":
                    names.append(".".join(strings[-2:]) if len(strings) >= 2 else "a global")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - truncated or not a pickle: the names seen so far
        pass
    return names


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(len(_LEGACY_MAGIC))
    except OSError:
        return b""


def _refusal(path: Path, error: BaseException, torch_detail: Optional[str]) -> UserError:
    """Why ``path`` did not load: it asks for objects (``UnsafeCheckpoint``), or it is empty, not a
    PyTorch file at all, or truncated/damaged (``CheckpointUnreadable``)."""
    if isinstance(error, OSError) and error.errno is not None:  # not the file's bytes: opening or reading it failed
        return CheckpointUnreadable(f"cannot read {path}: {error.strerror or error} (check the file's permissions "
                                    "and the disk)")
    head = _head(path)
    is_torch_file = head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC
    if is_torch_file:
        detail = torch_detail
    elif head.startswith(_PICKLE_PROTO):  # a raw pickle (pickle.dump, not torch.save)
        names = _pickled_globals(path)
        unsafe = [n for n in names if not n.startswith(_SAFE_PREFIXES)] or names
        detail = f"the pickled global {unsafe[0]}" if unsafe else None
    else:
        detail = None
    if detail is not None:
        return UnsafeCheckpoint(
            f"refusing to load {path}: it asks for {detail}, which could run code; "
            "only load files you trust, re-saved as a plain dict of tensors (model.state_dict())")
    if not head:
        return CheckpointUnreadable(f"{path} is empty, not a checkpoint (a write cut short, or the wrong file)")
    if not is_torch_file:
        return CheckpointUnreadable(f"{path} is not a checkpoint: it is not a file written by torch.save "
                                    "(pass a .pt checkpoint or a run folder)")
    reason = _first_sentence(str(error)) or type(error).__name__
    return CheckpointUnreadable(f"cannot read checkpoint {path}: {reason} (the file is truncated or damaged)")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; refuse files that need arbitrary pickles.

    Raises ``UnsafeCheckpoint`` for a file that asks for pickled objects (nothing in it is executed;
    the message names the global torch reports) and ``CheckpointUnreadable`` for anything else that
    does not load (empty, random bytes, a YAML file, truncated). ``mmap=True`` maps the tensors
    instead of reading them (for a quick look at a large file; ``map_location`` must be the CPU).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (pass a run folder or an existing .pt file)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # also "Unsupported operand 5": bytes that are no pickle of torch's
        raise _refusal(path, e, _unsafe_detail(str(e))) from None
    except torch.OutOfMemoryError:  # a RuntimeError, but not the file's fault
        raise
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError,
            UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise _refusal(path, e, None) from None
