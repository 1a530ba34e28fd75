"""Where a GKL-AT training step spends its time, phase by phase, and how often it waits for the GPU.

Run: ``python -m bench.step_profile [--device cuda] [--arch wrn-34-10 --batch 128]`` (CPU by default,
on a small net, so that it stays tested). It times ``training.engine.training_step`` through the
step's ``phase`` hook (natural forward, the K attack steps, AWP perturb = proxy refresh + proxy step
+ perturbation, training forward, backward, optimiser, AWP restore, bank + averaging) with CUDA
events on a GPU (perf_counter on the CPU), and on CUDA counts the host-device synchronisations of
one step with ``torch.cuda.set_sync_debug_mode("warn")``. Prints a Markdown table; ``--out`` appends
it to a results file.
"""
from __future__ import annotations

import argparse
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from bench.train_step import synthetic_step
from training.config import TrainConfig


class PhaseTimer:
    """The ``phase`` hook of ``training.engine.StepModules``: total seconds per phase name."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: dict[str, list] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.events[name].append(time.perf_counter() - t0)

    @property
    def names(self) -> list[str]:
        """The phases seen so far, in the order they first ran."""
        return list(self.events)

    def seconds(self) -> dict[str, float]:
        """Total seconds per phase (synchronises the device once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(s.elapsed_time(e) for s, e in v) / 1000 for k, v in self.events.items()}
        return {k: sum(v) for k, v in self.events.items()}


def count_syncs(step, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Host-device synchronisations of one ``step(x, y)`` on CUDA (where torch reports them)."""
    if x.device.type != "cuda":
        return []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def profile(cfg: TrainConfig, device: torch.device, steps: int, warmup: int) -> tuple[dict[str, float], float, list]:
    """Per-phase seconds per step, total seconds per step, and the syncs of one step."""
    m, step = synthetic_step(cfg, device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(cfg.batch_size, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, m.num_classes, (cfg.batch_size,), generator=g).to(device)
    if cfg.channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(warmup):
        step(x, y)
    syncs = count_syncs(step, x, y)
    timer = PhaseTimer(device)
    m.phase = timer
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    phases = timer.seconds()
    total = (time.perf_counter() - t0) / steps
    return {k: v / steps for k, v in phases.items()}, total, syncs


def table(phases: dict[str, float], total: float, batch: int) -> str:
    lines = ["| phase | ms/step | share of step |", "|---|---|---|"]
    for name, seconds in phases.items():
        lines.append(f"| {name} | {1000 * seconds:.2f} | {100 * seconds / total:.1f}% |")
    other = total - sum(phases.values())
    lines.append(f"| outside the phases (Python, launches) | {1000 * other:.2f} | {100 * other / total:.1f}% |")
    lines.append(f"| **step** | **{1000 * total:.2f}** | {batch / total:.1f} img/s |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="wrn-10-1")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--amp", default="off", choices=("off", "bf16"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=None, help="append the table to this Markdown file")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = TrainConfig(dataset="cifar100", arch=args.arch, batch_size=args.batch, eps=8 / 255, attack_budget="fixed",
                      attack_steps=args.k, attack_step_size=2 / 255, awp_gamma=0.005, awp_warmup=0,
                      averaging="epoch-ema", device=args.device, amp=args.amp,
                      channels_last=device.type == "cuda").validate()
    phases, total, syncs = profile(cfg, device, args.steps, args.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    text = (f"### Step profile: {args.arch}, C=100, batch {args.batch}, K={args.k} + AWP, amp {args.amp}, {name}\n\n"
            + table(phases, total, args.batch)
            + (f"\n\nHost-device syncs in one step: {len(syncs)} ({', '.join(syncs) or 'none'})\n"
               if device.type == "cuda" else "\n"))
    print(text)
    if args.out:
        with open(Path(args.out), "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
