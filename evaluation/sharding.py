"""Fixed chunks of the evaluated points: the unit of work, seeding and resume of a sharded evaluation.

The points ``0..n-1`` are split by index into chunks of ``chunk_size`` (the last may be shorter).
Every attack runs on a chunk in batches drawn from that chunk alone, AutoAttack seeds each chunk
from (seed, eps, attack, chunk index), and the multi-eps survivors are carried per chunk. A point's
flags therefore depend on its chunk only, never on which process attacked the chunk or how many
processes there were: process ``r`` of ``W`` takes chunks ``r, r + W, r + 2W, ...`` and the flags
are gathered in chunk order. One process is the case ``W = 1`` of the same code.

Processes come from torchrun (``RANK`` / ``WORLD_SIZE``) or from Slurm's srun (core.distributed);
the process group is gloo on the CPU and NCCL on GPUs, one GPU per process (``LOCAL_RANK``). With
more processes than chunks the processes without a chunk stay idle (:func:`idle_note`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch

from core.threat import eps_str
from errors import UserError

from .store import stable_hash

DEFAULT_CHUNK_SIZE = 250  # 10,000 points: 40 chunks, 5 per GPU on 8 GPUs
# A process that has attacked its chunks waits in the final gather for the slowest one; AutoAttack's
# cost per chunk varies with its robust points, so that wait can exceed torch's default timeout.
GATHER_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class Chunk:
    """Points ``start .. stop - 1`` of the evaluated set, the ``index``-th chunk."""

    index: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def part(self) -> slice:
        return slice(self.start, self.stop)

    def as_dict(self) -> dict[str, int]:
        return {"index": self.index, "start": self.start, "stop": self.stop}


@dataclass(frozen=True)
class Shard:
    """This process's place among the evaluating processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owned(self, chunks: list[Chunk]) -> list[Chunk]:
        """The chunks this process attacks: every ``world_size``-th one from its rank on."""
        return chunks[self.rank::self.world_size]

    @classmethod
    def current(cls) -> "Shard":
        """Rank and size of the initialised default process group, else a single process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


def split_chunks(n: int, chunk_size: int) -> list[Chunk]:
    """Chunks of ``chunk_size`` consecutive points covering ``0..n-1`` (the last may be shorter)."""
    if chunk_size < 1:
        raise UserError(f"--chunk-size must be >= 1, got {chunk_size}")
    return [Chunk(i, start, min(start + chunk_size, n)) for i, start in enumerate(range(0, n, chunk_size))]


def chunk_seed(seed: int, eps: float, attack: str, chunk: int) -> int:
    """Seed of ``attack`` at ``eps`` on chunk ``chunk``: a stable hash of the four (< 2**31)."""
    return int(stable_hash([int(seed), eps_str(eps), attack, int(chunk)])[:8], 16) & 0x7FFFFFFF


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it, or Slurm's task count under srun (1 when neither), read before
    any process group exists."""
    from core.distributed import world_size_from_env

    return world_size_from_env()


def env_rank() -> int:
    """``RANK`` as torchrun sets it, or Slurm's under srun (0 when absent or unreadable: then this process speaks)."""
    from core.distributed import adopt_slurm_env

    try:
        adopt_slurm_env()
        return int(os.environ.get("RANK", "0"))
    except (UserError, ValueError):
        return 0


def idle_note(n: int, chunk_size: int, world: int) -> Optional[str]:
    """One line naming the processes that get no chunk of the ``n`` points (None when all get one).

    Such processes join the process group and the final gather with nothing to attack: the results
    are the same as with fewer processes, and a job that waited in a queue for its GPUs still runs.
    """
    chunks = split_chunks(n, chunk_size)
    if world <= len(chunks):
        return None
    idle = list(range(len(chunks), world))
    names = f"rank {idle[0]} gets no chunk and waits" if len(idle) == 1 else \
        f"ranks {idle[0]}-{idle[-1]} get no chunk and wait"
    hint = f"--chunk-size {n // world} or less gives every process a chunk" if n >= world \
        else f"{n} points keep at most {n} processes busy"
    return (f"{world} processes but --chunk-size {chunk_size} splits the {n} points into {len(chunks)} chunk(s): "
            f"{names} idle (results unchanged; {hint})")


def device_for(device: torch.device, world: int) -> torch.device:
    """One GPU per process: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` when torchrun started several."""
    if device.type == "cuda" and device.index is None and world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def start(device: torch.device) -> Shard:
    """Join torchrun's process group (gloo on the CPU, NCCL on CUDA); a single process joins nothing."""
    from core.distributed import init_from_env

    if env_world_size() == 1:
        return Shard()
    info = init_from_env(device.type, timeout=GATHER_TIMEOUT)
    return Shard(info.rank, info.world_size)


def stop() -> None:
    from core.distributed import cleanup

    cleanup()


def gather(local: Any, shard: Shard) -> list[Any]:
    """Every process's ``local`` in rank order, on every process (``[local]`` for one process)."""
    if shard.world_size == 1:
        return [local]
    from core.distributed import gather_objects

    return gather_objects(local)


def merge_dicts(parts: list[dict]) -> dict:
    """One dict from the processes' dicts (their keys are disjoint: each chunk has one owner)."""
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def describe(shard: Shard, mine: list[Chunk], chunks: list[Chunk]) -> Optional[str]:
    """``"rank 1/4, 10 of 40 chunks"`` for a sharded run, None for one process."""
    if shard.world_size == 1:
        return None
    return f"rank {shard.rank}/{shard.world_size}, {len(mine)} of {len(chunks)} chunks"
