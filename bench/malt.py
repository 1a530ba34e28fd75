"""Benchmark: MALT against standard AutoAttack and APGD-T alone, on the same points of the same models.

Each attack is one ``evaluation.run_suite`` call (what ``eval_autoattack.py --attacks ...`` runs:
clean pass, chunks, exact bound checks) on the first ``--n`` test points, one after the other in
one process with one thread: ``malt`` (k=3 MALT targets of all other classes, targeted APGD at
100 iterations), ``aa:apgd-t`` (AutoAttack's APGD-T alone: 9 targets in logit order at 100
iterations) and ``aa`` (standard: APGD-CE, APGD-T, FAB-T, Square). Reported per model: robust
accuracy of each, of the worst case over AutoAttack and MALT, the points one broke that the other
left robust, which MALT target rank broke how many points, and the time ratio MALT / AutoAttack
in wall time and in CPU time of this process (the CPU ratio is the steadier one on a shared machine).
The figure that matters: MALT's robust accuracy minus AutoAttack's (target <= +0.5 points) at a
time ratio <= 0.3.

Models (trained into ``--work`` on first use, reused after): the digits small-cnn and WRN-10-1,
PGD-AT and GKL-AT (``train_at.py``, 15 epochs, eps 16/255, evaluated at 16/255), and a 100-class
task, ``pairs``: two digits side by side (class 10 a + b), a small-cnn trained with PGD-AT at
8/255 and evaluated at 16/255 (at 8/255 PGD-10 leaves 89% robust), where the classes that share a digit are each other's near boundaries.

    python -m bench.malt --work runs/bench-malt --n 150                   # every model, writes results/malt.md
    python -m bench.malt --work runs/bench-malt --models pairs --n 100 --append
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "malt.md"
ROOT = Path(__file__).resolve().parent.parent
DIGITS_RUNS = {"small-cnn-pgd-at": ("small-cnn", "pgd-at"), "small-cnn-gkl": ("small-cnn", "gkl"),
               "wrn-10-1-pgd-at": ("wrn-10-1", "pgd-at"), "wrn-10-1-gkl": ("wrn-10-1", "gkl")}
MODELS = (*DIGITS_RUNS, "pairs")
BASELINES = ("aa:apgd-t", "aa")
TARGET_GAP, TARGET_RATIO = 0.5, 0.3
RUN_CONFIG = """dataset: digits
augment: crop
arch: {arch}
loss: {loss}
alpha: 20.0
beta: 4.0
gamma: 1.0
tau: 4.0
eps: 16/255
eps_schedule: linear
attack_budget: effective
awp_gamma: 0.005
awp_warmup: 3
epochs: 15
batch_size: 64
lr: 0.05
lr_schedule: cosine-epoch
weight_decay: 0.0005
averaging: epoch-ema
avg_decay: 0.5
avg_start_epoch: 8
val_size: 200
eval_subset: 200
device: cpu
seed: 0
"""


# ------------------------------------------------------------------------------------------ models
def digits_model(work: Path, name: str) -> torch.nn.Module:
    """The digits run ``name`` (trained with train_at.py on first use)."""
    from checkpoints.run import load_model

    run = work / name
    if not (run / "checkpoints" / "last.pt").is_file():
        arch, loss = DIGITS_RUNS[name]
        work.mkdir(parents=True, exist_ok=True)
        (work / f"{name}.yaml").write_text(RUN_CONFIG.format(arch=arch, loss=loss))
        subprocess.run([sys.executable, str(ROOT / "train_at.py"), "--config", str(work / f"{name}.yaml"), "--out",
                        str(run), "--no-progress"], check=True, cwd=ROOT)
    return load_model(run, weights="avg", device="cpu")[0]


def pair_images(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of two digits side by side (each squeezed to 32x16) and labels 10 a + b, in [0, 1]."""
    from evaluation import load_eval_data

    x, y = load_eval_data("digits", split)
    half = F.interpolate(x, size=(32, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randint(len(y), (n,), generator=gen), torch.randint(len(y), (n,), generator=gen)
    return torch.cat([half[a], half[b]], dim=3).contiguous(), y[a] * 10 + y[b]


def pairs_model(work: Path, epochs: int = 12, eps: float = 8 / 255) -> torch.nn.Module:
    """small-cnn for the 100-class pairs task, PGD-AT (3 steps) at ``eps`` (trained on first use)."""
    from attacks import pgd
    from core.torch_files import load_checkpoint, save_checkpoint
    from models import build_model

    path = work / "pairs" / "model.pt"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("small-cnn", num_classes=100)
    if path.is_file():
        model.load_state_dict(load_checkpoint(path)["model"])
        return model.eval()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * 156)
    for epoch in range(epochs):
        x, y = pair_images("train", 156 * 64, seed=1000 + epoch)
        for i in range(0, len(y), 64):
            xb, yb = x[i:i + 64], y[i:i + 64]
            xb = pgd(model, xb, yb, eps=eps * min(1.0, (epoch + 1) / 4), step=eps / 2, steps=3, generator=gen)
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"pairs epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    save_checkpoint({"model": model.state_dict()}, path)
    return model


def model_and_points(work: Path, name: str, n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]:
    from evaluation import load_eval_data

    if name == "pairs":
        x, y = pair_images("test", n, seed=7)
        return pairs_model(work), x, y, 16 / 255
    x, y = load_eval_data("digits", "test", n_ex=n)
    return digits_model(work, name), x, y, 16 / 255


# ------------------------------------------------------------------------------------------ timing
def run_attack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, attack: str, norm: str,
               chunk: int, seed: int) -> dict[str, Any]:
    """One suite run of ``attack``: flags, wall and CPU seconds (and MALT's breaks per target rank)."""
    from evaluation import SuiteSettings, malt_runner, run_suite

    per_rank: list[list[int]] = []
    original = malt_runner.malt

    def observed(*args: Any, **kwargs: Any):
        result = original(*args, **kwargs)
        per_rank.append(result.successes_per_rank())
        return result

    settings = SuiteSettings.build([eps], [attack], norm=norm, batch_size=250, chunk_size=chunk, seed=seed)
    malt_runner.malt = observed
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        result = run_suite(model, x, y, settings, progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        malt_runner.malt = original
    ranks = [sum(column) for column in zip(*per_rank)] if per_rank else []
    return {"robust": result.robust(eps, settings.attacks[-1].name), "clean": result.clean, "wall": wall, "cpu": cpu,
            "per_rank": ranks, "warnings": result.warnings}


def compare(work: Path, name: str, n: int, norm: str, eps_text: str | None, chunk: int, malt: str,
            seed: int) -> dict[str, Any]:
    from core.threat import parse_eps

    model, x, y, eps = model_and_points(work, name, n)
    if eps_text is not None or norm != "Linf":
        eps = parse_eps(eps_text or "1.5", norm)
    runs = {}
    for attack in (malt, *BASELINES):
        r = runs["malt" if attack == malt else attack] = run_attack(model, x, y, eps, attack, norm, chunk, seed)
        print(f"{name} {attack}: robust {r['robust'].float().mean():.2%}, {r['wall']:.0f} s wall, {r['cpu']:.0f} s "
              f"cpu{'; ranks ' + str(r['per_rank']) if r['per_rank'] else ''}", file=sys.stderr, flush=True)
    return {"model": name, "n": n, "eps": eps, "norm": norm, "classes": int(model(x[:1]).shape[1]), "runs": runs,
            "malt": malt}


# ------------------------------------------------------------------------------------------ report
def _pct(flags: torch.Tensor) -> float:
    return 100.0 * flags.float().mean().item()


def row(c: dict[str, Any]) -> str:
    from core.threat import eps_text

    malt, apgdt, aa = (c["runs"][a] for a in ("malt", *BASELINES))
    m, t, a = malt["robust"], apgdt["robust"], aa["robust"]
    gap = _pct(m) - _pct(a)
    return (f"| {c['model']} ({c['classes']} cl.) | {c['malt']} | {eps_text(c['eps'], c['norm'])} | {c['n']} | {_pct(aa['clean']):.1f} "
            f"| {_pct(a):.2f} | {_pct(t):.2f} | {_pct(m):.2f} | **{gap:+.2f}** | {_pct(a & m):.2f} | "
            f"{int((a & ~m).sum())} / {int((m & ~a).sum())} | {int((t & ~m).sum())} / {int((m & ~t).sum())} | "
            f"{' / '.join(map(str, malt['per_rank']))} | {malt['wall']:.0f} / {apgdt['wall']:.0f} / {aa['wall']:.0f} | "
            f"**{malt['wall'] / aa['wall']:.2f}** / {malt['cpu'] / aa['cpu']:.2f} | {malt['cpu'] / apgdt['cpu']:.2f} |")


HEADER = ("| model | MALT | eps | n | clean % | AA % | APGD-T % | MALT % | MALT - AA (pts) | worst(AA, MALT) % | "
          "only MALT broke / only AA broke | only MALT / only APGD-T | MALT breaks per target rank | "
          "wall s MALT / APGD-T / AA | MALT / AA time (wall / CPU) | MALT / APGD-T CPU |")


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gaps = [_pct(c["runs"]["malt"]["robust"]) - _pct(c["runs"]["aa"]["robust"]) for c in rows]
    ratios = [c["runs"]["malt"]["cpu"] / c["runs"]["aa"]["cpu"] for c in rows]
    met = sum(g <= TARGET_GAP and r <= TARGET_RATIO for g, r in zip(gaps, ratios))
    lines = [f"## `python -m bench.malt {' '.join(args.argv)}`", "",
             f"Machine: {os.cpu_count()}-core {platform.machine()}, CPU, torch {torch.__version__}, 1 thread, "
             f"float32, load average at the end {load:.1f} (shared with other jobs). Each attack runs once per model, "
             f"in the order {args.malt}, {', '.join(BASELINES)}, chunk size {args.chunk_size}, seed {args.seed}.", "",
             HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    lines += [row(c) for c in rows]
    lines += ["", f"Target (MALT - AA <= +{TARGET_GAP} points at a CPU-time ratio <= {TARGET_RATIO}) met on "
              f"{met} of {len(rows)} model(s); largest gap {max(gaps):+.2f} points, CPU-time ratios "
              f"{min(ratios):.2f}-{max(ratios):.2f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="runs/bench-malt", help="where the models are trained and kept")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--n", type=int, default=150, help="test points per model (the first n)")
    p.add_argument("--norm", choices=("Linf", "L2"), default="Linf")
    p.add_argument("--eps", default=None, help="radius in the norm's notation (default 16/255, pairs 16/255; L2 1.5)")
    p.add_argument("--chunk-size", type=int, default=500)
    p.add_argument("--malt", default="malt", help="the MALT variant, e.g. malt:k=9 (default malt: k=3)")
    p.add_argument("--seed", type=int, default=0, help="the suite seed (every attack's)")
    p.add_argument("--append", action="store_true", help="append to results/malt.md instead of starting it")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    rows = [compare(Path(args.work), name, args.n, args.norm, args.eps, args.chunk_size, args.malt,
                    args.seed) for name in args.models]
    text = report(rows, args)
    print(text)
    previous = RESULTS.read_text() if args.append and RESULTS.is_file() else "# MALT beside AutoAttack\n\n"
    RESULTS.write_text(previous + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
