"""Benchmark: the suite's AutoAttack against a direct pyautoattack run with identical flags, side by side.

Suite: ``evaluation.run_suite`` with ``--attacks aa`` (standard) at one eps, with a result store in a
temp folder, exactly what ``eval_autoattack.py`` runs (clean pass, chunks, per-attack state files,
result files, bound checks). Direct: ``pyautoattack.AutoAttack(version="standard")``'s
``run_standard_evaluation`` on the same points, one call per chunk of the suite with that chunk's
seed and the weights frozen as the suite freezes them, so both make the same batches and must find
the same robust flags (checked). The two
alternate in order over ``--repeats`` pairs in one process (same threads, same warm caches); each
pair gives a ratio of wall time and of CPU time (user + system, this process), and the report gives
the median and the range over the pairs, so a noisy, shared machine shows as spread.

    python -m bench.aa_overhead                       # tiny-cnn PGD-AT 8/255 on 100 digits points, 3 pairs
    python -m bench.aa_overhead --n 297 --repeats 3   # the issue's point count
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

from bench.eval_multi_eps import train_digits_model
from core.threat import eps_str, parse_eps
from evaluation import ResultStore, SuiteSettings, load_eval_data, run_suite
from evaluation.sharding import chunk_seed, split_chunks

RESULTS = Path(__file__).resolve().parent / "results" / "aa_overhead.md"
TARGET = 1.02


def suite_run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: SuiteSettings) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as folder:
        store = ResultStore(folder, {"bench": "aa_overhead", "n": len(y)})
        result = run_suite(model, x, y, settings, store=store, progress=False)
    return result.robust(settings.eps[0], "aa")


def direct_run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: SuiteSettings) -> torch.Tensor:
    """pyautoattack's own evaluation of each chunk (its seed from the suite's rule), flags concatenated.

    The weights are frozen as the suite freezes them (``attacks.attack_mode``): pyautoattack's APGD
    calls ``loss.backward()``, which on trainable weights also computes (and discards) their
    gradients, a cost the suite does not pay and that would hide the suite's own overhead.
    """
    from pyautoattack import AutoAttack

    from attacks import attack_mode

    eps, device = settings.eps[0], next(model.parameters()).device
    flags = []
    for chunk in split_chunks(len(y), settings.chunk_size):
        adversary = AutoAttack(model, norm=settings.norm, eps=eps, version="standard", device=device,
                               seed=chunk_seed(settings.seed, eps, "aa", chunk.index))
        with torch.random.fork_rng(), attack_mode(model):
            _, y_adv = adversary.run_standard_evaluation(x[chunk.part].to(device), y[chunk.part].to(device),
                                                         batch_size=settings.batch_size)
        flags.append((y_adv == y[chunk.part].to(device)).cpu())
    return torch.cat(flags)


def timed(fn: Callable[[], torch.Tensor], model: torch.nn.Module) -> tuple[torch.Tensor, float, float, int]:
    """(result, wall seconds, CPU seconds: user + system of this process, images through the model).

    The image count is the work measure no machine load can blur: the attacks' own forwards are
    the same on both sides, so the suite's extra forwards (clean pass, checks per call) show in it.
    """
    images = [0]
    hook = model.register_forward_pre_hook(lambda module, inputs: images.__setitem__(0, images[0] + len(inputs[0])))
    try:
        before, start = os.times(), time.perf_counter()
        out = fn()
        wall, after = time.perf_counter() - start, os.times()
    finally:
        hook.remove()
    return out, wall, (after.user - before.user) + (after.system - before.system), images[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100, help="first N digits test points")
    p.add_argument("--repeats", type=int, default=3, help="pairs of (suite, direct) runs, alternating order")
    p.add_argument("--eps", default="8/255")
    p.add_argument("--train-eps", type=float, default=8.0, help="PGD-AT radius (x/255) of the trained model")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--arch", default="tiny-cnn")
    p.add_argument("--model", default=None, help="a run folder or checkpoint instead of training one")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=None, help="default: the suite's default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model:
        from checkpoints.run import load_model

        model, _ = load_model(args.model, device=torch.device("cpu"))
        what = args.model
    else:
        model = train_digits_model(args.train_eps / 255, args.epochs, args.arch)
        what = f"{args.arch}, PGD-AT at {args.train_eps:g}/255 for {args.epochs} epochs on digits"
    x, y = load_eval_data("digits", "test", n_ex=args.n)
    chunk = {"chunk_size": args.chunk_size} if args.chunk_size else {}
    settings = SuiteSettings.build([parse_eps(args.eps)], ["aa"], seed=args.seed, batch_size=args.batch_size, **chunk)
    suite_run(model, x[:4], y[:4], settings)  # warm-up: lazy imports, allocator
    direct_run(model, x[:4], y[:4], settings)
    pairs = []
    for r in range(args.repeats):
        order = [("suite", suite_run), ("direct", direct_run)][:: 1 if r % 2 == 0 else -1]
        got = {name: timed(lambda fn=fn: fn(model, x, y, settings), model) for name, fn in order}
        same = torch.equal(got["suite"][0], got["direct"][0])
        pairs.append({"order": " then ".join(n for n, _ in order), "same": same, "robust": int(got["suite"][0].sum()),
                      **{f"{k}_{name}": got[name][i] for name in got
                         for i, k in ((1, "wall"), (2, "cpu"), (3, "images"))}})
        print(f"pair {r + 1}: suite {got['suite'][1]:.1f} s / direct {got['direct'][1]:.1f} s wall, "
              f"flags identical: {same}", flush=True)
    text = report(args, what, settings, pairs)
    Path(args.out).write_text(text)
    print(text)
    return 0 if all(pair["same"] for pair in pairs) else 1


def _spread(values: list[float]) -> str:
    return f"**{statistics.median(values):.3f}x** (range {min(values):.3f} to {max(values):.3f})"


def report(args: argparse.Namespace, what: str, settings: SuiteSettings, pairs: list[dict]) -> str:
    wall = [p["wall_suite"] / p["wall_direct"] for p in pairs]
    cpu = [p["cpu_suite"] / p["cpu_direct"] for p in pairs]
    lines = ["# The suite's AutoAttack vs a direct pyautoattack run", "",
             f"Written by `{' '.join(['python -m bench.aa_overhead', *sys.argv[1:]])}`. Machine: {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPU(s) shared with other jobs, {args.threads} torch thread(s), torch "
             f"{torch.__version__}, Python {platform.python_version()}.", "",
             f"Model: {what}. Points: first {args.n} digits test images; AutoAttack standard at "
             f"{eps_str(settings.eps[0])}, batch {settings.batch_size}, chunk size {settings.chunk_size} "
             f"({len(split_chunks(args.n, settings.chunk_size))} chunk(s)); both sides make the same batches "
             "with the same seeds.", "",
             "| pair | order | suite wall s | direct wall s | wall ratio | suite CPU s | direct CPU s | CPU ratio "
             "| robust | flags identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(pairs, 1):
        lines.append(f"| {i} | {p['order']} | {p['wall_suite']:.1f} | {p['wall_direct']:.1f} | "
                     f"{p['wall_suite'] / p['wall_direct']:.3f} | {p['cpu_suite']:.1f} | {p['cpu_direct']:.1f} | "
                     f"{p['cpu_suite'] / p['cpu_direct']:.3f} | {p['robust']}/{args.n} | "
                     f"{'yes' if p['same'] else 'NO'} |")
    images = pairs[0]["images_suite"], pairs[0]["images_direct"]
    lines += ["", f"Suite / direct, median over {len(pairs)} pairs: wall {_spread(wall)}, CPU {_spread(cpu)} "
              f"(target <= {TARGET}x). Images through the model (forward passes, every pair): suite {images[0]}, "
              f"direct {images[1]}, **{images[0] / images[1]:.4f}x**.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
