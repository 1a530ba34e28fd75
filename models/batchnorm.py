"""BatchNorm variants that keep state-dict keys: ghost BatchNorm and the layer swap behind it and sync-bn.

Ghost BatchNorm computes batch statistics over chunks of a batch, as ``nn.DataParallel`` does.

The released GKL-AT runs trained on 4 GPUs with ``nn.DataParallel``: every forward was scattered
into 4 chunks (``torch.chunk``: 32 images each at batch 128), each replica normalised its own
chunk, and only replica 0 shares the module's buffers, so the running statistics that were kept
are those of the first chunk alone (the other replicas' updates land on copies that are dropped).
:class:`GhostBatchNorm2d` computes exactly that on one device: in training mode the input is split
like DataParallel's scatter into ``splits`` chunks, chunk 0 goes through the ordinary BatchNorm
(updating the running statistics and ``num_batches_tracked``), the other chunks are normalised
with their own statistics and leave the buffers alone. In eval mode it is plain BatchNorm.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class GhostBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training forward normalises ``splits`` chunks separately (see module doc)."""

    def __init__(self, num_features: int, splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits <= 1:
            return super().forward(x)
        chunks = x.chunk(self.splits)  # DataParallel's scatter: ceil(B / splits) images per chunk
        first = super().forward(chunks[0])
        rest = [F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks[1:]]
        return torch.cat([first, *rest])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, splits={self.splits}"


def replace_batchnorm(module: nn.Module, make: Callable[[nn.Module], nn.Module],
                      kinds: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,)) -> nn.Module:
    """Replace every layer of ``kinds`` in ``module`` by ``make(layer)``, sharing its parameters and buffers.

    The new layers take over the old ones' tensors and train/eval mode under the same names, so
    state-dict keys and values do not change. ``make`` may return the layer itself (kept as it is).
    """
    if isinstance(module, kinds):
        new = make(module)
        if new is not module:
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            if module.track_running_stats:
                new.running_mean, new.running_var = module.running_mean, module.running_var
                new.num_batches_tracked = module.num_batches_tracked
            new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, replace_batchnorm(child, make, kinds))
    return module


def convert_ghost_batchnorm(module: nn.Module, splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a :class:`GhostBatchNorm2d` with ``splits`` chunks.

    Parameters and buffers are shared, so exported checkpoints load strictly into the plain
    architecture. ``splits <= 1`` returns ``module`` unchanged.
    """
    if splits <= 1:
        return module

    def make(bn: nn.Module) -> nn.Module:
        if isinstance(bn, GhostBatchNorm2d):
            return bn
        return GhostBatchNorm2d(bn.num_features, splits, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                track_running_stats=bn.track_running_stats)

    return replace_batchnorm(module, make, (nn.BatchNorm2d,))
