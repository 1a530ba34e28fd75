"""Process-group helpers: one code path for 1..N processes, used by training and evaluation.

The processes come from torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) or from Slurm's ``srun`` (one process per task): :func:`adopt_slurm_env` writes
torchrun's variables from Slurm's, so everything after it is torchrun's code path.
"""
from __future__ import annotations

import inspect
import os
import re
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


SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 40000  # MASTER_PORT of a Slurm job: a function of its job id


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``gpu[07-09,12],cpu1`` -> ``gpu07``; ``r[1-2]-n[3,4]`` -> ``r1-n3``)."""
    host = ""
    for prefix, bracket, rest in re.findall(r"([^\[,]*)(?:\[([^\]]*)\])?(,?)", nodelist.strip()):
        host += prefix + re.split(r"[,\-]", bracket)[0]
        if rest or not (prefix or bracket):
            break
    if not host:
        raise UserError(f"cannot read the first host of the Slurm node list {nodelist!r}: set MASTER_ADDR")
    return host


def slurm_launch_env(environ: Optional[dict] = None) -> Optional[dict[str, str]]:
    """torchrun's variables for a process that ``srun`` started as one of N > 1 tasks, else None.

    Only a job step has ``SLURM_STEP_NUM_TASKS`` (a batch script that runs one python does not). The
    rendezvous is the step's first node, on a port derived from the job id (the same for every task
    and every allocation of a requeued job); ``MASTER_ADDR`` / ``MASTER_PORT`` already set win.
    """
    env = os.environ if environ is None else environ
    tasks = env.get("SLURM_STEP_NUM_TASKS")
    if tasks is None or "WORLD_SIZE" in env:
        return None
    try:
        world, rank, local = int(tasks), int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0"))
        job = int(env.get("SLURM_JOB_ID", "0"))
    except (KeyError, ValueError):
        raise UserError("srun started this process but SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_JOB_ID are "
                        "missing or not numbers: launch with srun inside a Slurm job, or with torchrun") from None
    if world <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
            "MASTER_PORT": env.get("MASTER_PORT") or str(SLURM_PORT_BASE + job % SLURM_PORT_SPAN)}


def adopt_slurm_env() -> None:
    """Under ``srun`` with several tasks, set torchrun's variables from Slurm's (see :func:`slurm_launch_env`)."""
    found = slurm_launch_env()
    if found:
        os.environ.update(found)


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it, or Slurm's task count under ``srun`` (1 when neither), checked
    before any process group exists."""
    adopt_slurm_env()
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        raise UserError(f"WORLD_SIZE={text!r} is not a number of processes: launch with torchrun") from None
    if world < 1:
        raise UserError(f"WORLD_SIZE={world} must be at least 1")
    return world


def init_from_env(device_type: str, timeout: Optional[timedelta] = None) -> DistInfo:
    """Initialise the process group when launched by torchrun or srun (more than one process), else
    a single process.

    ``timeout`` bounds how long a collective waits for the slowest rank (torch's default if None).
    """
    world = world_size_from_env()
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
