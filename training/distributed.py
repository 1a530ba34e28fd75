"""torch.distributed helpers: one code path for 1..N processes launched by torchrun."""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent), checked before any process group exists."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        raise UserError(f"WORLD_SIZE={text!r} is not a number of processes: launch with torchrun") from None
    if world < 1:
        raise UserError(f"WORLD_SIZE={world} must be at least 1")
    return world


def init_from_env(device_type: str, timeout: Optional[timedelta] = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1), else single process.

    ``timeout`` bounds how long a collective waits for the slowest rank (torch's default if None).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        extra = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", **extra)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor that needs no gradient over all ranks (``t`` itself in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def max_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The largest ``value`` over all ranks, on every rank (a collective; ``value`` in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj: object) -> list:
    """Every rank's ``obj`` in rank order, on every rank (``[obj]`` in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the incoming gradient: every rank's loss depends
    on every rank's input through the sum."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``t`` over all ranks (``t`` itself in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    return _SumOverRanks.apply(t)


def ddp_wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``module`` that leaves BatchNorm buffers rank-local in forward.

    Buffers are not broadcast from rank 0 at every forward: with sync-bn they are equal anyway, and
    without it each rank keeps the statistics of its own part of the batch.
    """
    ids = [device.index] if device.type == "cuda" else None
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, **no_sync)


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
    from models.batchnorm import replace_batchnorm

    def make(bn: nn.Module) -> nn.Module:
        if isinstance(bn, GlobalBatchNorm):
            return bn
        return GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)

    return replace_batchnorm(module, make)
