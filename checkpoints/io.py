"""Checkpoint folders: what a resume needs besides the atomic writer and the safe loader.

Writing and loading live in :mod:`core.torch_files` (re-exported here): a checkpoint is one dict of
tensors and plain Python values, loaded with ``torch.load(..., weights_only=True)`` and written
atomically, so a crash at any moment leaves the previous complete file or the new one.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from core.files import TEMP_GLOB, remove_temp_files
from core.torch_files import (CheckpointUnreadable, UnsafeCheckpoint, load_checkpoint, save_checkpoint,  # noqa: F401
                              write_failure)
from errors import UserError

LAST = "last.pt"
EPOCH_GLOB = "epoch_*.pt"
# Temp files this project writes next to their targets (checkpoints, the CSV log, the run-folder
# write probe; ``.NAME.pt.link`` from run folders of earlier versions). A SIGKILL can leave them
# behind; a resume removes them.
TEMP_PATTERNS = (TEMP_GLOB, ".*.pt.link", ".write_probe.*")


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files left by writes that were killed mid-way; returns what was removed.

    Call it only when no other process writes into ``folder`` (at the start of a resume).
    """
    return remove_temp_files(folder, TEMP_PATTERNS)


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
def load_latest_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                           mmap: bool = False) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest complete checkpoint in a run's ``checkpoints/`` folder: ``(path, state, notes)``.

    ``last.pt`` when it loads; when it is missing or unreadable for any reason (copied half-way,
    damaged disk, empty, random bytes), the epoch checkpoint with the highest global step. Temp
    files are never candidates. A file that asks for pickled objects (which could run code) is
    refused rather than skipped. ``notes`` say what was skipped. ``mmap``: see ``load_checkpoint``.
    """
    folder = Path(folder)
    notes: list[str] = []
    last = folder / LAST
    if last.is_file():
        try:
            return last, load_checkpoint(last, map_location, mmap=mmap), notes
        except CheckpointUnreadable as e:
            notes.append(str(e))
    best: Optional[tuple[int, Path, dict[str, Any]]] = None
    for path in sorted(folder.glob(EPOCH_GLOB), reverse=True):
        try:
            state = load_checkpoint(path, map_location, mmap=mmap)
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
