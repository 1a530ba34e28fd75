"""Benchmark: GKL loss forward+backward, O(B*C) identity vs the pairwise B x C x C form, on CPU.

Run: ``.venv/bin/python -m bench.loss`` (writes bench/results/loss.md as well as printing).

Both forms compute the full GKL loss in float32 (class-wise weights, gamma 0.4, BA on, the
soft-label CE term included) and must agree in value. Time is the minimum wall time of one
forward+backward after a warm-up, over at least ``--repeats`` runs and, for fast calls, as many
as fit in 2 s (the minimum is the figure least disturbed by other processes on a shared
machine). Peak memory is the highest amount of tensor memory live at once during
forward+backward, from torch's own CPU allocator: the profiler (``profile_memory=True``) records
every allocation and free with its size, and the running sum of those sizes in time order is the
live tensor memory (inputs allocated before the run are excluded). The pairwise form needs about
6 B*C*C floats (12 GiB at B=512, C=1000): when its predicted peak exceeds ``--max-pairwise-gib``
it is measured on a batch of B / 2^k and both its time and memory are scaled by 2^k, which is
exact for memory (every intermediate is per-sample) and close for time (the work is per-sample
elementwise); the table says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from losses import gkl_loss

ALPHA, BETA, GAMMA = 20.0, 5.0, 0.4
HEADER = """# GKL loss: O(B*C) form vs pairwise B x C x C form (forward+backward, CPU)

Speed-up = pairwise time / O(BC) time; memory ratio = pairwise peak / O(BC) peak. Method (see the
docstring of bench/loss.py): minimum wall time over repeats; peak live tensor bytes from the
torch profiler's allocation events (torch's CPU allocator), inputs excluded.
"""


def pairwise_gkl(o_m: torch.Tensor, o_n: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The naive form (the paper's Algorithm 1): materialises B x C x C differences and weights."""
    v = scores.pow(GAMMA)
    w = v[:, :, None] * v[:, None, :]
    dm = o_m[:, :, None] - o_m[:, None, :]
    dn = o_n[:, :, None] - o_n[:, None, :]
    wmse = (w * (dm - dn).pow(2)).sum() / w.sum()
    soft_ce = -(torch.softmax(o_m.detach(), -1) * torch.log_softmax(o_n, -1)).sum(-1).mean()
    return ALPHA / 4 * wmse + BETA * soft_ce


def fast_gkl(o_m: torch.Tensor, o_n: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The project's O(B*C) form."""
    return gkl_loss(o_m, o_n, alpha=ALPHA, beta=BETA, gamma=GAMMA, scores=scores)[0]


def make_inputs(batch: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    o_m = (3 * torch.randn(batch, classes, generator=g)).requires_grad_()
    o_n = (o_m.detach() + 0.5 * torch.randn(batch, classes, generator=g)).requires_grad_()
    scores = torch.softmax(torch.randn(batch, classes, generator=g), -1)
    return o_m, o_n, scores


def step(form: Callable, inputs: tuple[torch.Tensor, ...]) -> float:
    """One forward+backward; returns the loss value."""
    o_m, o_n, scores = inputs
    o_m.grad = o_n.grad = None
    loss = form(o_m, o_n, scores)
    loss.backward()
    return loss.item()


def min_time(form: Callable, inputs: tuple[torch.Tensor, ...], repeats: int,
             min_seconds: float = 2.0) -> float:
    """Minimum over at least ``repeats`` runs, and more (up to 500) until ``min_seconds`` passed."""
    step(form, inputs)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 500):
        start = time.perf_counter()
        step(form, inputs)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_bytes(form: Callable, inputs: tuple[torch.Tensor, ...]) -> int:
    """Peak live tensor bytes of one forward+backward, from the profiler's allocation events."""
    step(form, inputs)  # so lazily created state (grad buffers' first use) is not special
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(form, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    sizes = [e["args"]["Bytes"] for e in sorted(events, key=lambda e: e["ts"])
             if e.get("name") == "[memory]"]
    live = peak = 0
    for size in sizes:
        live += size
        peak = max(peak, live)
    return peak


def measure(form: Callable, batch: int, classes: int, repeats: int) -> dict[str, float]:
    inputs = make_inputs(batch, classes)
    return {"time": min_time(form, inputs, repeats), "peak": peak_bytes(form, inputs),
            "value": step(form, inputs)}


def pairwise_batch(batch: int, classes: int, max_bytes: float) -> int:
    """Largest B / 2^k whose predicted pairwise peak fits ``max_bytes`` (probe at B=4, linear)."""
    per_sample = peak_bytes(pairwise_gkl, make_inputs(4, classes)) / 4
    sub = batch
    while sub > 1 and per_sample * sub > max_bytes:
        sub //= 2
    return sub


def run(batch: int, classes: int, repeats: int, max_bytes: float) -> dict[str, float]:
    fast = measure(fast_gkl, batch, classes, repeats)
    sub = pairwise_batch(batch, classes, max_bytes)
    pair = measure(pairwise_gkl, sub, classes, max(1, repeats if sub == batch else repeats // 2))
    scale = batch / sub
    fast_value = step(fast_gkl, make_inputs(sub, classes))
    if abs(pair["value"] - fast_value) > 1e-4 * abs(pair["value"]):
        raise AssertionError(f"forms disagree at C={classes}: {pair['value']} vs {fast_value}")
    return {"C": classes, "B": batch, "pair_B": sub, "fast_ms": 1e3 * fast["time"],
            "pair_ms": 1e3 * pair["time"] * scale, "fast_mib": fast["peak"] / 2**20,
            "pair_mib": pair["peak"] * scale / 2**20}


def machine() -> str:
    model = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                 .splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return (f"{os.cpu_count()}-core {platform.machine()} CPU ({model}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, float32, load average at the end "
            f"{os.getloadavg()[0]:.1f}")


def report(rows: list[dict[str, float]]) -> str:
    lines = [f"Machine: {machine()}", "",
             "| C | B | pairwise measured at B | O(BC) ms | pairwise ms | speed-up | "
             "O(BC) peak MiB | pairwise peak MiB | memory ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = str(r["pair_B"]) if r["pair_B"] == r["B"] else f"{r['pair_B']} (scaled x{r['B'] // r['pair_B']})"
        lines.append(f"| {r['C']} | {r['B']} | {note} | {r['fast_ms']:.2f} | {r['pair_ms']:.1f} | "
                     f"{r['pair_ms'] / r['fast_ms']:.1f}x | {r['fast_mib']:.2f} | "
                     f"{r['pair_mib']:.1f} | {r['pair_mib'] / r['fast_mib']:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-pairwise-gib", type=float, default=2.0,
                        help="largest predicted pairwise peak run at full batch (else scaled)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loss.md")
    parser.add_argument("--append", action="store_true",
                        help="add this run as a section of --out instead of rewriting it")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run(args.batch, c, args.repeats, args.max_pairwise_gib * 2**30) for c in args.classes]
    text = report(rows)
    print(text)
    command = " ".join(["python -m bench.loss", *sys.argv[1:]])
    section = f"## `{command}`\n\n{text}\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.out.exists():
        args.out.write_text(args.out.read_text() + "\n" + section)
    else:
        args.out.write_text(HEADER + "\n" + section)


if __name__ == "__main__":
    main()
