"""Benchmark: six-eps (2..12/255) PGD-20 + AutoAttack evaluation, shared work vs six separate runs.

Shared: one suite run over ascending eps, each attack only on the points it could not break at
the previous eps. Baseline: six independent suite runs, one eps each, on the same model, points
and seeds. Reports the wall-time ratio and both robust accuracies per eps (shared must be the same
or lower: it keeps every break found at a smaller eps).

    python -m bench.eval_multi_eps                      # trains two tiny-cnn digits models (PGD-AT 8/255, 2/255)
    python -m bench.eval_multi_eps --model runs/quick   # or any run folder / checkpoint
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from core.threat import eps_str
from evaluation import SuiteSettings, load_eval_data, run_suite

EPS = [e / 255 for e in (2, 4, 6, 8, 10, 12)]
ATTACKS = ["pgd20", "aa"]
RESULTS = Path(__file__).resolve().parent / "results" / "eval_multi_eps.md"
HEADER = """# Multi-eps evaluation: shared work vs six separate runs

Written by `bench/eval_multi_eps.py`. The shared run evaluates eps in ascending order and attacks,
at each eps, only the points still robust at the previous one. What it can save is the work spent
on points that break between two consecutive eps: a point that stays robust must be attacked in
full at every eps by both schemes, and by the attacks' budgets such a point costs AutoAttack about
40x a point APGD-CE breaks (APGD-T and FAB-T over 9 target classes at 100 iterations each and 5000
Square queries, against the 100 APGD-CE steps every point gets). So whenever some points survive
part of 2..12/255, AutoAttack's time is theirs and the ratio stays near 1.

"""


def train_digits_model(eps: float, epochs: int, arch: str = "tiny-cnn", seed: int = 0) -> torch.nn.Module:
    """``arch`` trained with PGD-AT (3 steps) at ``eps`` on the digits training split."""
    from attacks import pgd
    from models import build_model

    x, y = load_eval_data("digits", "train")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(arch, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - 63, 64):
            xb, yb = x[perm[i:i + 64]], y[perm[i:i + 64]]
            if eps > 0:
                xb = pgd(model, xb, yb, eps=eps, step=eps / 2, steps=3, generator=gen)
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def timed_suite(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: list[float], batch_size: int,
                progress: bool = False):
    settings = SuiteSettings.build(eps, ATTACKS, batch_size=batch_size)
    start = time.perf_counter()
    result = run_suite(model, x, y, settings, progress=progress)
    return result, time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="run folder or checkpoint (default: train a digits PGD-AT small-cnn)")
    p.add_argument("--n", type=int, default=100, help="digits test points evaluated")
    p.add_argument("--train-eps", type=float, nargs="+", default=[8, 2],
                   help="PGD-AT radius (x/255) of each trained model (one benchmark per value); "
                        "0 trains a standard model")
    p.add_argument("--arch", default="tiny-cnn", help="architecture of the trained models")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--progress", action="store_true", help="per-(eps, attack) lines while running")
    p.add_argument("--append", action="store_true", help="append to --out (several models in one file)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y = load_eval_data("digits", "test", n_ex=args.n)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.append:
        out.write_text(HEADER)
    for model, what in models(args, device):
        shared, t_shared = timed_suite(model, x, y, EPS, args.batch_size, args.progress)
        print(f"shared six-eps run: {t_shared:.1f} s", flush=True)
        separate, t_separate = {}, {}
        for eps in EPS:
            separate[eps], t_separate[eps] = timed_suite(model, x, y, [eps], args.batch_size, args.progress)
            print(f"separate run at {eps_str(eps)}: {t_separate[eps]:.1f} s", flush=True)
        text = report(what, args, device, shared, separate, t_shared, t_separate)
        with open(out, "a") as f:
            f.write(text)
        print(text, flush=True)
    return 0


def models(args: argparse.Namespace, device: torch.device):
    """Yield (model, description) for ``--model`` or for each ``--train-eps``."""
    if args.model:
        from checkpoints.run import load_model

        model, _ = load_model(args.model, device=device)
        yield model, args.model
        return
    for train_eps in args.train_eps:
        start = time.perf_counter()
        model = train_digits_model(train_eps / 255, args.epochs, args.arch).to(device)
        how = f"PGD-AT at {train_eps:g}/255" if train_eps > 0 else "standard training"
        yield model, (f"{args.arch}, {how} for {args.epochs} epochs on digits "
                      f"(trained in {time.perf_counter() - start:.0f} s)")


def report(what: str, args: argparse.Namespace, device: torch.device, shared, separate, t_shared: float,
           t_separate: dict[float, float]) -> str:
    total = sum(t_separate.values())
    ratio = t_shared / total
    lines = [f"## {what.split(' (')[0]}", "",
             f"Model: {what}. Points: first {args.n} digits test images (clean accuracy "
             f"{shared.clean.float().mean().item():.1%}). Attacks: PGD-20 (step eps/4, uniform start) and "
             f"AutoAttack standard, eps 2..12/255. Device: {device}, {torch.get_num_threads()} thread(s), "
             f"torch {torch.__version__}. One run each.", "",
             f"Wall time: shared {t_shared:.1f} s, six separate runs {total:.1f} s, "
             f"**ratio {ratio:.2f}x** (target <= 0.75x).", "",
             "| eps | PGD-20 separate | PGD-20 shared | AA separate | AA shared | points AA attacked "
             "separate / shared | seconds separate / shared | same or lower |",
             "|---|---|---|---|---|---|---|---|"]
    all_ok = True
    for eps in EPS:
        sep = separate[eps]
        ok = all(shared.accuracy(eps, a) <= sep.accuracy(eps, a) for a in ATTACKS)
        all_ok &= ok
        lines.append(f"| {eps_str(eps)} | {sep.accuracy(eps, 'pgd20'):.1%} | {shared.accuracy(eps, 'pgd20'):.1%} | "
                     f"{sep.accuracy(eps, 'aa'):.1%} | {shared.accuracy(eps, 'aa'):.1%} | "
                     f"{sep.results[(eps, 'aa')].attacked} / {shared.results[(eps, 'aa')].attacked} | "
                     f"{t_separate[eps]:.1f} / {sum(shared.results[(eps, a)].seconds for a in ATTACKS):.1f} | "
                     f"{'yes' if ok else 'NO'} |")
    lines += ["", f"Shared accuracy same or lower at every eps: {'yes' if all_ok else 'NO'}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
