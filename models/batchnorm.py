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
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from core.distributed import sum_over_ranks


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


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the batch of all ranks, for any device (``nn.SyncBatchNorm`` is GPU-only).

    The per-channel sums travel through the differentiable all-reduce, so the backward pass
    sums their gradients over ranks exactly as a single process with the whole batch would.
    Outside training, or in a single process, it is plain batch normalisation.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        # Two passes (mean, then squared deviations) avoid E[x^2] - E[x]^2 cancellation.
        total = sum_over_ranks(torch.cat([x.sum(dims), count]))
        n = total[-1].detach()
        mean = total[:-1] / n
        centred = x - mean.reshape(shape)
        var = sum_over_ranks(centred.square().sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(var_unbiased.to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Batch norm over all ranks: ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere.

    Parameters and buffers are shared with the original layers; state-dict keys do not change.
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    def make(bn: nn.Module) -> nn.Module:
        if isinstance(bn, GlobalBatchNorm):
            return bn
        return GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)

    return replace_batchnorm(module, make)
