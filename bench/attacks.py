"""Benchmark: images/s of this project's PGD-10 vs a baseline's PGD-10, same model and batch (CPU; or CUDA).

The baseline is ``--baseline reference`` (default: the textbook loop of ``bench/reference.py``, no
extra package) or ``--baseline torchattacks`` (``torchattacks.PGD``, pip-installed into a throwaway
folder for this run only: it never enters the project's environment, see ``bench/reference.py``).
Both run L-inf PGD on cross-entropy, eps 8/255, step 2/255, 10 steps, uniform random start, on the
same batch of digits test images (32x32x3) and the same model in eval mode (random weights: the
cost does not depend on them). Each repeat times one run of each implementation back to back, in
alternating order, so that both see the same machine load; the headline ratio is the median over
repeats of (baseline time / ours time), i.e. ours images/s over the baseline's images/s
(target >= 1.0). Median and best images/s per implementation are reported beside it; on a shared,
loaded machine the best-of figures can come from one lucky quiet moment, the paired median cannot.

    python -m bench.attacks                                 # small-cnn and wrn-10-1, 2 threads
    python -m bench.attacks --baseline torchattacks --append    # needs PyPI once (a throwaway folder)
    python -m bench.attacks --device cuda --models wrn-28-10 --batch 256 --append   # on a GPU machine
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from attacks import pgd
from data import Digits
from models import build_model

from .reference import reference_pgd, torchattacks_module

RESULTS = Path(__file__).resolve().parent / "results" / "attacks.md"
EPS, STEP, STEPS = 8 / 255, 2 / 255, 10


def digits_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` digits test images (repeated if n > 360) as contiguous float tensors in [0, 1]."""
    ds = Digits(train=False)
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.tensor(ds.targets)
    reps = -(-n // len(y))
    return x.repeat(reps, 1, 1, 1)[:n].contiguous(), y.repeat(reps)[:n]


def time_once(run: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def baseline_attack(name: str, model: torch.nn.Module, device: torch.device,
                    torchattacks_dir: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The baseline's PGD-10 as ``attack(x, y)``: the reference loop, or torchattacks' PGD."""
    if name == "torchattacks":
        torchattacks = torchattacks_module(torchattacks_dir)
        return torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)
    g = torch.Generator(device=device).manual_seed(1)
    return lambda x, y: reference_pgd(model, x, y, eps=EPS, step=STEP, steps=STEPS, generator=g)


def compare(model_name: str, batch: int, repeats: int, device: torch.device, baseline: str = "reference",
            torchattacks_dir: str = "") -> dict:
    """Alternating timed runs of both attacks; returns images/s (best and median) and the ratio."""
    model = build_model(model_name, num_classes=10).to(device).eval()
    x, y = (t.to(device) for t in digits_batch(batch))
    g = torch.Generator(device=device).manual_seed(0)
    ours = lambda: pgd(model, x, y, eps=EPS, step=STEP, steps=STEPS, generator=g)  # noqa: E731
    attack = baseline_attack(baseline, model, device, torchattacks_dir)
    theirs = lambda: attack(x, y)  # noqa: E731
    for _ in range(2):  # warm-up: allocator, kernels, GPU clocks
        ours(), theirs()
    times: dict[str, list[float]] = {"ours": [], baseline: []}
    runs = [("ours", ours), (baseline, theirs)]
    for i in range(repeats):
        for name, run in runs if i % 2 == 0 else runs[::-1]:  # alternate the order too
            times[name].append(time_once(run, device))
    paired = [t_ref / t_ours for t_ours, t_ref in zip(times["ours"], times[baseline])]
    return {"model": model_name, "batch": batch, "baseline": baseline,
            "best": {k: batch / min(v) for k, v in times.items()},
            "median": {k: batch / statistics.median(v) for k, v in times.items()},
            "ratio": statistics.median(paired),
            "ratio_best": min(times[baseline]) / min(times["ours"])}


def report(rows: list[dict], args: argparse.Namespace, device: torch.device) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"## `python -m bench.attacks {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Machine: {os.cpu_count()}-core {platform.machine()}, {where}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), float32, load average at the end {load:.1f}. "
             f"L-inf PGD-{STEPS}, eps 8/255, step 2/255, uniform start, {args.repeats} alternating repeats.", "",
             f"| model | batch | ours img/s (median) | {args.baseline} img/s (median) | ratio (median of pairs) "
             f"| ours img/s (best) | {args.baseline} img/s (best) | ratio (best) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        theirs = r["baseline"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['median']['ours']:.1f} | {r['median'][theirs]:.1f} "
                     f"| **{r['ratio']:.2f}x** | {r['best']['ours']:.1f} | {r['best'][theirs]:.1f} "
                     f"| {r['ratio_best']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["small-cnn", "wrn-10-1"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (the reported figure) or cuda")
    p.add_argument("--baseline", choices=("reference", "torchattacks"), default="reference",
                   help="reference: the textbook loop of bench/reference.py; torchattacks: torchattacks.PGD, "
                        "pip-installed into a throwaway folder for this run")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--append", action="store_true", help="add to the results file instead of replacing it")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-torchattacks-") as folder:
        rows = [compare(name, args.batch, args.repeats, device, args.baseline, folder) for name in args.models]
    text = report(rows, args, device)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ("# PGD-10 throughput: this project's `attacks.pgd` vs a baseline PGD-10\n\n"
              "Ratio = ours images/s / the baseline's images/s on the same model and batch (target >= 1.0); the "
              "baseline is the textbook loop of bench/reference.py or `torchattacks.PGD` (`--baseline`). "
              "Method: see the docstring of bench/attacks.py.\n\n")
    previous = out.read_text() if args.append and out.exists() else header
    out.write_text(previous.rstrip() + "\n\n" + text if args.append else header + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
