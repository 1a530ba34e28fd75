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


class WeightAverager:
    """Owns the averaged model and decides when to update it."""

    def __init__(self, model: nn.Module, mode: str, *, decay: float = 0.9, start_epoch: int = 1,
                 step_decay: float = 0.995, step_warmup: int = 0) -> None:
        self.mode, self.start_epoch, self.step_warmup = mode, start_epoch, step_warmup
        self.avg: Optional[AveragedModel] = None
        if mode == "epoch-ema":
            self.avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        elif mode == "step-ema":
            # AveragedModel holds the copy; the per-step update below keeps its count on the host,
            # because update_parameters reads n_averaged from the device (a sync every step).
            self.avg = AveragedModel(model, use_buffers=True)
            self.step_decay, self._count = step_decay, 0
        elif mode != "none":
            raise ValueError(f"unknown averaging {mode!r}")

    def after_step(self, model: nn.Module, global_step: int) -> None:
        if self.mode == "step-ema" and global_step > self.step_warmup:
            self._step_update(model)

    @torch.no_grad()
    def _step_update(self, model: nn.Module) -> None:
        mine = list(self.avg.module.parameters()) + list(self.avg.module.buffers())
        theirs = list(model.parameters()) + list(model.buffers())
        n = self._count
        floats = [(a, b) for a, b in zip(mine, theirs) if a.is_floating_point()]
        if n == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            decay = min(self.step_decay, (1 + n) / (10 + n))
            torch._foreach_lerp_([a for a, _ in floats], [b for _, b in floats], 1 - decay)
            for a, b in zip(mine, theirs):
                if not a.is_floating_point():  # BatchNorm's num_batches_tracked: the model's count
                    a.copy_(b)
        self._count = n + 1
        self.avg.n_averaged.fill_(self._count)

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.mode == "epoch-ema" and epoch >= self.start_epoch:
            self.avg.update_parameters(model)

    @property
    def module(self) -> Optional[nn.Module]:
        """The averaged network, or None before the first update (or without averaging)."""
        if self.avg is None or int(self.avg.n_averaged) == 0:
            return None
        return self.avg.module

    def load(self, avg_weights: Optional[dict], count: Optional[torch.Tensor]) -> None:
        """Restore the averaged weights and their update count (as saved in a checkpoint)."""
        if self.avg is None or avg_weights is None:
            return
        self.avg.module.load_state_dict(avg_weights)
        self.avg.n_averaged.copy_(count)
        if self.mode == "step-ema":
            self._count = int(count)

    def state_dict(self) -> Optional[dict]:
        return None if self.avg is None else self.avg.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.avg is not None and state is not None:
            self.avg.load_state_dict(state)
            if self.mode == "step-ema":
                self._count = int(self.avg.n_averaged)
