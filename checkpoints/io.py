"""Atomic checkpoint writing, safe loading and the checks a resume needs.

A checkpoint is one dict of tensors and plain Python values, so it loads with
``torch.load(..., weights_only=True)``: no pickled code is ever executed. It is written to a temp
file in the same folder (``.NAME.<random>.tmp``), fsync'ed and renamed over ``NAME``, so a crash at
any moment leaves the previous complete file or the new complete file, never a partial one.
"""
from __future__ import annotations

import errno
import math
import os
import pickle
import re
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from errors import UserError

LAST = "last.pt"
EPOCH_GLOB = "epoch_*.pt"
# Temp files this project writes next to their targets: checkpoints, checkpoint links, the CSV log, the
# run-folder write probe. A SIGKILL can leave them behind; a resume removes them.
TEMP_PATTERNS = (".*.pt.*.tmp", ".*.pt.link", ".log.csv.tmp", ".write_probe")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNSAFE_DETAIL = re.compile(r"Unsupported (?:global: GLOBAL [\w.]+|operand \d+|[a-z]+: [\w.]+)")


class CheckpointUnreadable(UserError):
    """The file is truncated, corrupted or not a PyTorch checkpoint."""


class UnsafeCheckpoint(UserError):
    """Loading the file would need arbitrary pickled objects (which can run code)."""


# --------------------------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    """Open a new temp file next to ``path`` with the umask's permissions (mkstemp would force 0600)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(path.parent))


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """The OSError behind ``exc`` (torch's zip writer wraps a failed write in a RuntimeError)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def write_failure(path: Path, err: OSError, kept: str = "the previous checkpoint is kept") -> UserError:
    """The one-line error for a checkpoint (or log) that could not be written; ``kept`` says what is safe."""
    reason = err.strerror or str(err)
    hint = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions"
    return UserError(f"cannot write {path}: {reason} (errno {err.errno}); {kept}. "
                     f"{hint.capitalize()}, then continue with --resume")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    A crash at any moment leaves either the previous complete file or the new complete file; a
    failed write (disk full, permissions) removes its temp file and raises ``UserError``.
    """
    path = Path(path)
    tmp: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        cause = _os_error_in(e) if isinstance(e, (OSError, RuntimeError)) else None
        if cause is not None:
            raise write_failure(path, cause) from None
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files left by writes that were killed mid-way; returns what was removed.

    Call it only when no other process writes into ``folder`` (at the start of a resume).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for pattern in TEMP_PATTERNS:
        for p in folder.glob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return sorted(removed)


def tensor_bytes(state: Any) -> int:
    """Total bytes of the tensors in a (nested) state: a lower bound of its file size."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def ensure_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise ``UserError`` when ``folder``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(f"{folder} has {_mb(free)} free but {what} need about {_mb(needed)}: "
                        "free some space or choose another --out")


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------------------- checks
def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors (and floats) in ``state`` that hold NaN or inf."""
    if isinstance(state, torch.Tensor):
        if state.is_floating_point() and not bool(torch.isfinite(state).all()):
            return [prefix or "<tensor>"]
        return []
    if isinstance(state, float):
        return [] if math.isfinite(state) else [prefix]
    items: Iterable = ()
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    bad: list[str] = []
    for key, value in items:
        bad += nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))
    return bad


def check_compatible(state: dict[str, Any], path: str | os.PathLike, *, arch: str, num_classes: int) -> None:
    """Refuse a checkpoint whose architecture or class count differs from the config's, naming both."""
    ck_arch, ck_classes = state.get("arch"), state.get("num_classes")
    if ck_arch is not None and ck_arch != arch:
        raise UserError(f"{path} holds a {ck_arch} model but the config says --arch {arch}: "
                        "use the run folder the checkpoint came from, or start a new run")
    if ck_classes is not None and int(ck_classes) != int(num_classes):
        raise UserError(f"{path} holds a {ck_classes}-class model ({state.get('dataset')}) but the config's "
                        f"dataset has {num_classes} classes: use the run folder the checkpoint came from")


# --------------------------------------------------------------------------------------- loading
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


def load_latest_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu"
                           ) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest complete checkpoint in a run's ``checkpoints/`` folder: ``(path, state, notes)``.

    ``last.pt`` when it loads; when it is missing or unreadable (copied half-way, damaged disk),
    the epoch checkpoint with the highest global step. Temp files are never candidates. A file
    that would need arbitrary pickles is refused rather than skipped. ``notes`` say what was skipped.
    """
    folder = Path(folder)
    notes: list[str] = []
    last = folder / LAST
    if last.is_file():
        try:
            return last, load_checkpoint(last, map_location), notes
        except CheckpointUnreadable as e:
            notes.append(str(e))
    best: Optional[tuple[int, Path, dict[str, Any]]] = None
    for path in sorted(folder.glob(EPOCH_GLOB), reverse=True):
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointUnreadable as e:
            notes.append(str(e))
            continue
        step = int(state.get("global_step", -1)) if isinstance(state, dict) else -1
        if best is None or step > best[0]:
            best = (step, path, state)
    if best is None:
        detail = f" ({notes[0]})" if notes else ""
        raise UserError(f"{folder} holds no complete checkpoint to resume from{detail}; start a new run "
                        "with --out (or --overwrite)")
    notes.append(f"resuming from {best[1].name} (global step {best[0]}), the newest complete checkpoint")
    return best[1], best[2], notes
