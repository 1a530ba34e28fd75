"""Weight averaging on top of ``torch.optim.swa_utils.AveragedModel``.

- ``epoch-ema`` (released GKL-AT weights): at the end of every epoch from ``avg_start_epoch`` on,
  avg = decay * avg + (1 - decay) * w, BatchNorm buffers included; the first update copies w.
- ``step-ema`` (DM-AT): after every optimiser step (after ``step_ema_warmup`` steps) with the
  warm-up decay min(decay, (1 + n) / (10 + n)), n = number of updates so far.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def _warmup_ema_multi_avg_fn(decay: float):
    @torch.no_grad()
    def update(ema: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = n_averaged.to(torch.float32)
        d = torch.minimum(torch.tensor(decay, device=n.device), (1 + n) / (10 + n))
        if torch.is_floating_point(ema[0]):
            torch._foreach_mul_(ema, d.to(ema[0].dtype))
            torch._foreach_add_(ema, torch._foreach_mul(current, (1 - d).to(ema[0].dtype)))
        else:  # integer buffers (BatchNorm's num_batches_tracked): keep the model's count
            torch._foreach_copy_(ema, current)

    return update


class WeightAverager:
    """Owns the averaged model and decides when to update it."""

    def __init__(self, model: nn.Module, mode: str, *, decay: float = 0.9, start_epoch: int = 1,
                 step_decay: float = 0.995, step_warmup: int = 0) -> None:
        self.mode, self.start_epoch, self.step_warmup = mode, start_epoch, step_warmup
        self.avg: Optional[AveragedModel] = None
        if mode == "epoch-ema":
            self.avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        elif mode == "step-ema":
            self.avg = AveragedModel(model, multi_avg_fn=_warmup_ema_multi_avg_fn(step_decay), use_buffers=True)
        elif mode != "none":
            raise ValueError(f"unknown averaging {mode!r}")

    def after_step(self, model: nn.Module, global_step: int) -> None:
        if self.mode == "step-ema" and global_step > self.step_warmup:
            self.avg.update_parameters(model)

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.mode == "epoch-ema" and epoch >= self.start_epoch:
            self.avg.update_parameters(model)

    @property
    def module(self) -> Optional[nn.Module]:
        """The averaged network, or None before the first update (or without averaging)."""
        if self.avg is None or int(self.avg.n_averaged) == 0:
            return None
        return self.avg.module

    def state_dict(self) -> Optional[dict]:
        return None if self.avg is None else self.avg.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.avg is not None and state is not None:
            self.avg.load_state_dict(state)
