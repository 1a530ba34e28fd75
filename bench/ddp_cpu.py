"""Benchmark: GKL-AT step throughput on CPU with 1 vs 2 gloo processes at the same global batch.

Run: ``.venv/bin/python -m bench.ddp_cpu`` (writes bench/results/ddp_cpu.md). Report only, no target.

Every configuration runs ``training.engine.training_step`` (K-step PGD on the GKL objective, AWP, GKL-AT
loss, SGD) on the same global batch of random images; with 2 processes each rank takes its half
and DDP all-reduces the model's and the AWP proxy's gradients (gloo). Configurations: 1 process
with 1 thread, 1 process with 2 threads, 2 processes with 1 thread each (the last two use the same
cores). Time: the minimum over ``--steps`` timed steps (after one warm-up step) of the wall time
of a step, measured on rank 0 between barriers.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.train_step import bench_config, synthetic_step
from core import distributed as dist_utils


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, threads: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
    torch.manual_seed(0)
    info = dist_utils.init_from_env("cpu")
    m, step = synthetic_step(bench_config(args.arch, args.batch, args.k), torch.device("cpu"), distributed=info.enabled)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, m.num_classes, (args.batch,), generator=g)
    part = args.batch // world
    x, y = x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]
    times = []
    for i in range(args.steps + 1):
        dist_utils.barrier()
        start = time.perf_counter()
        step(x, y)
        dist_utils.barrier()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    if rank == 0:
        torch.save(times, out)
    dist_utils.cleanup()


def measure(world: int, threads: int, args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.pt")
        mp.start_processes(_worker, args=(world, threads, _free_port(), args, out), nprocs=world,
                           start_method="spawn")
        return torch.load(out, weights_only=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wrn-10-1")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--k", type=int, default=5, help="PGD steps of the training attack")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ddp_cpu.md"))
    args = p.parse_args()
    configs = [(1, 1), (1, 2), (2, 1)]
    rows = []
    for world, threads in configs:
        times = measure(world, threads, args)
        rows.append((world, threads, min(times), times))
        print(f"{world} process(es) x {threads} thread(s): best {min(times):.3f} s/step", flush=True)
    base = rows[0][2]
    lines = [f"## `python -m bench.ddp_cpu {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, fp32, load "
             f"average at the end {os.getloadavg()[0]:.1f} (shared machine). Step: {args.arch}, C=100, global batch "
             f"{args.batch}, K={args.k}, AWP on; gloo.", "",
             "| processes x threads | best s/step | images/s | vs 1x1 | all step times s |", "|---|---|---|---|---|"]
    for world, threads, best, times in rows:
        lines.append(f"| {world} x {threads} | {best:.3f} | {args.batch / best:.1f} | {base / best:.2f}x | "
                     f"{', '.join(f'{t:.3f}' for t in times)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text("# GKL-AT step on CPU: 1 vs 2 gloo processes, same global batch\n\n" + text)


if __name__ == "__main__":
    main()
