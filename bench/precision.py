"""Benchmark: does bf16 autocast move GKL-AT's results? fp32 vs bf16, 3 seeds each, AutoAttack.

Run: ``.venv/bin/python -m bench.precision`` (CPU; about 30 min on 2 cores; writes
bench/results/precision.md). On CUDA the presets train in bf16 autocast by default (``--amp
auto``) while the released scripts trained in fp32; this measures the difference where it can be
measured here: the quickstart setting (digits, tiny-cnn, GKL + bank + AWP + linear eps, K = 5),
trained with seeds 0, 1, 2 in fp32 (``--amp off``) and with CPU bf16 autocast (``--amp bf16``),
each evaluated with AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square) at the training eps on the
whole digits test split (360 images) by the project's own evaluation (``eval_autoattack.py``,
which runs in fp32), averaged weights as the quickstart reports them. The reading compares the
difference of the means with the seed-to-seed spread (sample standard deviation).

Runs are kept under ``--work`` (default runs/bench-precision); a finished training or evaluation
is reused, so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

SEEDS = (0, 1, 2)
MODES = ("off", "bf16")
RESULT = Path(__file__).resolve().parent / "results" / "precision.md"


def _config(seed: int, amp: str):
    from training.config import TrainConfig, load_preset

    return TrainConfig.from_dict({**load_preset("quickstart"), "preset": "quickstart", "seed": seed,
                                  "amp": amp, "device": "cpu"}).validate()


def _timed(run: Path, what: str, work) -> float:
    """Run ``work()`` unless ``run/bench_times.json`` says it finished; returns its (recorded) seconds."""
    from core.files import atomic_write_text

    path = run / "bench_times.json"
    times = json.loads(path.read_text()) if path.is_file() else {}
    if what not in times:
        start = time.time()
        work()
        times[what] = time.time() - start
        atomic_write_text(path, json.dumps(times))
    return times[what]


def _train(run: Path, seed: int, amp: str) -> float:
    """Train one run (a killed one resumes); returns the training time in seconds."""
    from training.trainer import Trainer

    resume = (run / "checkpoints" / "last.pt").is_file()
    return _timed(run, "train_s", lambda: Trainer(_config(seed, amp), run, resume=resume, progress=False).fit())


def _evaluate(run: Path, eps: str) -> tuple[float, float, float]:
    """(clean, AutoAttack) accuracy of ``run`` on the 360 test images, and the evaluation time."""
    import eval_autoattack
    from evaluation.compare import load_report

    def work() -> None:
        argv = [str(run), "--attacks", "clean", "aa", "--eps", eps, "--device", "cpu", "--quiet"]
        if (run / "eval").is_dir():
            argv.append("--resume")  # AutoAttack's state files of an interrupted evaluation
        if eval_autoattack.main(argv) != 0:
            raise SystemExit(f"evaluation of {run} failed")

    seconds = _timed(run, "eval_s", work)
    rep = load_report(run)
    aa = next(r for r in rep.rows if r.attack == "aa")
    if rep.n != 360:
        raise SystemExit(f"{run}: evaluated {rep.n} images, expected the 360 of the digits test split")
    return rep.clean_accuracy, aa.robust_accuracy, seconds


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _markdown(rows: list[dict], eps: str) -> str:
    seconds = sum(r["train_s"] + r["eval_s"] for r in rows)
    by = {m: [r for r in rows if r["amp"] == m] for m in MODES}
    lines = ["# Precision: fp32 vs bf16 autocast, GKL-AT quickstart setting, 3 seeds", "",
             "## `python -m bench.precision`", "",
             f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: {os.cpu_count()}-core "
             f"{platform.machine()} ({_cpu_name()}, shared with other jobs), torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s). Setting: `--preset quickstart` (digits, tiny-cnn, 10 epochs, "
             f"GKL with the bank, AWP, linear eps to {eps}, K = 5) with `--seed 0/1/2` and `--amp off` or "
             f"`--amp bf16` (CPU autocast). Evaluation: `eval_autoattack.py RUN --attacks clean aa --eps {eps}` "
             "(AutoAttack standard, fp32, averaged weights) on all 360 digits test images. Training and "
             f"evaluation time of the six runs: {seconds / 60:.0f} min.", "",
             "| training precision | seed | clean % | AA % | train s | eval s |", "|---|---|---|---|---|---|"]
    for m in MODES:
        for r in by[m]:
            lines.append(f"| {r['label']} | {r['seed']} | {100 * r['clean']:.2f} | {100 * r['aa']:.2f} | "
                         f"{r['train_s']:.0f} | {r['eval_s']:.0f} |")
    lines += ["", "| training precision | clean % mean ± sd | AA % mean ± sd |", "|---|---|---|"]
    summary = {}
    for m in MODES:
        clean, aa = _stats([100 * r["clean"] for r in by[m]]), _stats([100 * r["aa"] for r in by[m]])
        summary[m] = (clean, aa)
        lines.append(f"| {by[m][0]['label']} | {clean[0]:.2f} ± {clean[1]:.2f} | {aa[0]:.2f} ± {aa[1]:.2f} |")
    (c32, a32), (c16, a16) = summary["off"], summary["bf16"]
    spread_aa, spread_clean = max(a32[1], a16[1]), max(c32[1], c16[1])
    loss_aa, loss_clean = a32[0] - a16[0], c32[0] - c16[0]
    verdict = ("loses more than the seed-to-seed spread" if loss_aa > spread_aa or loss_clean > spread_clean
               else "does not lose more than the seed-to-seed spread")
    lines += ["", f"Reading: bf16 minus fp32 is {-loss_clean:+.2f} points clean and {-loss_aa:+.2f} points AA; the "
              f"larger seed-to-seed standard deviation is {spread_clean:.2f} (clean) and {spread_aa:.2f} (AA). "
              f"On this setting bf16 autocast {verdict}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/bench-precision", help="folder for the six runs (reused when finished)")
    p.add_argument("--out", default=str(RESULT), help="Markdown table to write")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from core.files import atomic_write_text
    from core.threat import eps_str

    eps = eps_str(_config(0, "off").eps)
    rows = []
    for seed in SEEDS:
        for amp in MODES:
            run = Path(args.work) / f"{'fp32' if amp == 'off' else 'bf16'}-seed{seed}"
            train_s = _train(run, seed, amp)
            clean, aa, eval_s = _evaluate(run, eps)
            rows.append({"amp": amp, "label": "fp32" if amp == "off" else "bf16 autocast", "seed": seed,
                         "clean": clean, "aa": aa, "train_s": train_s, "eval_s": eval_s})
            print(f"{run.name}: clean {100 * clean:.2f} AA {100 * aa:.2f} (train {train_s:.0f} s, eval "
                  f"{eval_s:.0f} s)", flush=True)
    text = _markdown(rows, eps)
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
