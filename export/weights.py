"""Exported weights: RobustBench's key layout, ``.pt`` or ``.safetensors`` files, and their verification.

Every export is checked: the written file is loaded strictly into RobustBench's class and its
logits are compared with this project's model on a batch (fp32, TF32 off).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn

from core.device import module_device
from core.files import atomic_write
from core.torch_files import load_checkpoint, save_checkpoint
from errors import UserError

from .arch import LOGIT_TOLERANCE, RobustBenchArch, max_logit_diff, probe_batch


class ExportMismatch(Exception):
    """The written weights do not reproduce this project's model in RobustBench's class (exit 1)."""

    exit_code = 1


def robustbench_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as independent, contiguous CPU tensors (RobustBench's key layout)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``state_dict`` atomically: ``.safetensors`` by suffix (with ``metadata``), else ``torch.save``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return save_checkpoint(dict(state_dict), path)
    from safetensors.torch import save as to_bytes

    data = to_bytes(dict(state_dict), metadata=dict(metadata or {}))
    return atomic_write(path, lambda f: f.write(data))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an exported state dict (``.pt`` with ``weights_only=True``, or ``.safetensors``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise UserError(f"weights file not found: {path}")
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise UserError(f"cannot read {path}: {e} (the file is truncated or not safetensors)") from None
    state = load_checkpoint(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a plain state dict of tensors")
    return dict(state)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_into_robustbench(arch: RobustBenchArch, path: str | os.PathLike) -> nn.Module:
    """RobustBench's model with the weights file loaded strictly; ``ExportMismatch`` when it fails."""
    model = arch.build()
    try:
        model.load_state_dict(load_weights(path), strict=True)
    except RuntimeError as e:
        raise ExportMismatch(f"{path} does not load strictly into RobustBench's {arch.call_source()}: "
                             f"{' '.join(str(e).split())[:300]}") from None
    return model.eval()


def verify_export(model: nn.Module, arch: RobustBenchArch, path: str | os.PathLike, *,
                  n: int = 16, tolerance: float = LOGIT_TOLERANCE) -> float:
    """Load ``path`` into RobustBench's class and compare logits with ``model``; returns the max diff.

    Raises ``ExportMismatch`` when the load is not strict or the difference is >= ``tolerance``.
    """
    device = module_device(model)
    rb_model = load_into_robustbench(arch, path).to(device)
    diff = max_logit_diff(model, rb_model, probe_batch(n, device))
    if not diff < tolerance:  # NaN fails too
        raise ExportMismatch(f"RobustBench's {arch.call_source()} with {path} gives logits up to {diff:.3g} "
                             f"away from this project's model (limit {tolerance:g} in fp32)")
    return diff
