"""Weights files in the shapes other code bases write, read without running any pickled code.

A file is a ``torch.save`` file (read with ``weights_only=True``, :func:`core.torch_files.load_checkpoint`)
or a safetensors file (``safetensors.torch.load_file``; recognised by its header, whatever its
name). Its state dict may sit under ``state_dict``, ``model``, ``model_state_dict`` or ``net``
(nested too: ``{"model": {"state_dict": ...}}``), and its keys may carry the prefixes that
``nn.DataParallel`` / DDP (``module.``), ``torch.compile`` (``_orig_mod.``) or a wrapping module
(``model.``, ``net.``) add: :func:`fit_state_dict` takes the reading whose keys fit the model.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from core.torch_files import CheckpointUnreadable, load_checkpoint
from errors import UserError

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
_KEY_PREVIEW = 4  # bad keys named in a strict-loading error
_SAFETENSORS_MAX_HEADER = 100 * 2**20


def is_safetensors(path: str | os.PathLike) -> bool:
    """True when ``path`` starts like a safetensors file: a little-endian u64 header size, then ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return 2 <= size <= _SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def read_weights(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """The contents of a weights file: a safetensors file's tensors, or a torch file loaded safely."""
    path = Path(path)
    if not is_safetensors(path):
        return load_checkpoint(path, map_location)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointUnreadable(f"cannot read safetensors file {path}: {str(e).splitlines()[0][:160]} "
                                   "(the file is truncated or damaged)") from None


def unwrap_state_dict(state: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict inside ``state``: under the usual wrapper keys, or ``state`` itself."""
    seen = 0
    while isinstance(state, Mapping) and not _all_tensors(state) and seen < 4:
        inner = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state, seen = inner, seen + 1
    if not isinstance(state, Mapping) or not state or not _all_tensors(state):
        raise UserError(f"{path} is neither a checkpoint of this project nor a state dict of tensors (also looked "
                        f"under {', '.join(WRAPPER_KEYS)}): save model.state_dict()")
    return dict(state)


def _all_tensors(state: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


def _readings(sd: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
    """``sd`` as saved, then with every shared wrapper prefix removed in turn (outermost first)."""
    yield sd
    while True:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            return
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        yield sd


def fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The reading of ``sd`` that loads strictly into ``model``; else ``UserError`` "``what``: why"."""
    readings = list(_readings(sd))
    problems = []
    for reading in readings:
        problem = state_dict_mismatch(model, reading)
        if not problem:
            return reading
        problems.append(problem)
    # Report the reading closest to fitting: the fewest keys missing or unexpected.
    closest = min(range(len(readings)), key=lambda i: _distance(model, readings[i]))
    raise UserError(f"{what}: {problems[closest]}")


def _distance(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> int:
    own = model.state_dict()
    return len(own.keys() ^ sd.keys())


def state_dict_mismatch(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    """Describe why ``sd`` would not load strictly into ``model`` (empty string when it would)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    parts = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
        if keys:
            more = f" (+{len(keys) - _KEY_PREVIEW} more)" if len(keys) > _KEY_PREVIEW else ""
            parts.append(f"{label}: {', '.join(keys[:_KEY_PREVIEW])}{more}")
    if not parts:
        return ""
    return "; ".join(parts) + " (wrong --arch or --dataset?)"
