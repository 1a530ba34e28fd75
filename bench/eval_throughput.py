"""Benchmark: seconds per robust point of each AutoAttack component, and the projected AutoAttack wall time.

Each component of AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square, at the version's budgets:
100 iterations, 9 target classes, 5000 queries) runs through pyautoattack on a fixed batch of B
points that none of its steps can break, so every point costs the full budget: the model is
wrapped to add ``MARGIN`` to the logit of the class every point is labelled with. The wrapper
changes no shape and no operation of the attack (the margin is a constant: the gradients are
the model's), so the time is that of a point that stays robust, the cost that dominates
AutoAttack. Model weights are random (the cost does not depend on them). Variants: fp32 with TF32
off and on (CUDA only) and, with ``--compile``, ``torch.compile`` of the model, kept only if it
leaves the APGD-CE flags of a sample of real points unchanged.

From the per-point costs: the projected time of AutoAttack standard on 10,000 points (``--points``)
at the paper's clean and AutoAttack accuracy (APGD-CE attacks the clean-correct points, the other
three the robust ones: the few points APGD-T breaks are counted as robust, a slight overestimate),
with the suite's chunks (batches never exceed a chunk's survivors), per GPU and on 8 GPUs.

    python -m bench.eval_throughput        # CPU: tiny-cnn, batches of 2 and 4, a minute or two; writes the results
    python -m bench.eval_throughput --device cuda --arch wrn-34-10 --num-classes 10 100 \\
        --batch-sizes 64 128 256 512 --compile
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from evaluation.sharding import DEFAULT_CHUNK_SIZE
from models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "eval_throughput.md"
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
MARGIN = 1e3
EPS = 8 / 255
PAPER = {10: ("cifar10-gkl", 0.8480, 0.5709), 100: ("cifar100-gkl", 0.6576, 0.3191)}  # README preset table


class NeverFooled(nn.Module):
    """``model`` with ``MARGIN`` added to class ``label``'s logit: no perturbation in the ball changes the decision."""

    def __init__(self, model: nn.Module, label: int = 0) -> None:
        super().__init__()
        self.model, self.label = model, label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        bonus = torch.zeros_like(logits[:1])
        bonus[0, self.label] = MARGIN
        return logits + bonus


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def component_seconds(model: nn.Module, name: str, batch: int, device: torch.device, seed: int = 0) -> float:
    """Wall seconds of one AutoAttack-standard component on ``batch`` never-fooled points."""
    from attacks import attack_mode
    from attacks.rb_bridge import autoattack_class

    wrapped = NeverFooled(model).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    adversary = autoattack_class()(wrapped, norm="Linf", eps=EPS, seed=seed, verbose=False, version="standard",
                                  device=device)
    adversary.attacks_to_run = [name]  # the library's way to run one component with the version's budgets
    with attack_mode(wrapped), torch.random.fork_rng():  # frozen weights, as in the suite
        _sync(device)
        start = time.perf_counter()
        _, y_adv = adversary.run_standard_evaluation(x, y, bs=batch, return_labels=True)
        _sync(device)
        seconds = time.perf_counter() - start
    if not torch.equal(y_adv, y):
        raise RuntimeError(f"{name} broke a never-fooled point: the timing would not be a robust point's")
    return seconds


def compile_keeps_flags(model: nn.Module, compiled: nn.Module, device: torch.device, n: int = 32) -> bool:
    """APGD-CE (standard budget) flags of eager and compiled models on ``n`` random points agree."""
    from attacks import autoattack

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 32, 32, generator=gen).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    flags = [autoattack(m, x, y, eps=EPS, version="custom", attacks=["apgd-ce"], seed=0, batch_size=n)[1]
             for m in (model, compiled)]
    return torch.equal(flags[0], flags[1])


def variants(args: argparse.Namespace, device: torch.device) -> list[str]:
    names = ["fp32", "tf32"] if device.type == "cuda" else ["fp32"]
    return names + ([f"{names[-1]}+compile"] if args.compile else [])


def measure(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for num_classes in args.num_classes:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_model(args.arch, num_classes=num_classes).to(device).eval()
        for variant in variants(args, device):
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = "tf32" in variant
            net = model
            if variant.endswith("+compile"):
                net = torch.compile(model)
                if not compile_keeps_flags(model, net, device):
                    notes.append(f"{args.arch} C={num_classes}: torch.compile changed APGD-CE flags on a sample: "
                                 "compiled timings left out")
                    continue
            component_seconds(net, "apgd-ce", min(args.batch_sizes), device)  # warm-up (kernels, compile)
            for batch in args.batch_sizes:
                for name in COMPONENTS:
                    seconds = component_seconds(net, name, batch, device)
                    rows.append({"arch": args.arch, "C": num_classes, "variant": variant, "batch": batch,
                                 "component": name, "s_per_point": seconds / batch})
                    print(f"{args.arch} C={num_classes} {variant} batch {batch} {name}: "
                          f"{seconds / batch:.4f} s/point", flush=True)
    return rows, notes


def nearest(batches: list[int], wanted: float) -> int:
    """The measured batch size closest to ``wanted`` on a log scale."""
    return min(batches, key=lambda b: abs(math.log(b) - math.log(max(wanted, 1.0))))


def projection(rows: list[dict], num_classes: int, variant: str, args: argparse.Namespace,
               chunk_size: int, gpus: int) -> tuple[float, str]:
    """Projected seconds of AutoAttack standard on ``args.points`` points, and how the batches were chosen."""
    _, clean, robust = PAPER.get(num_classes, PAPER[10])
    cost = {(r["batch"], r["component"]): r["s_per_point"] for r in rows
            if r["C"] == num_classes and r["variant"] == variant}
    batches = sorted({b for b, _ in cost})
    wanted = [min(frac * chunk_size, args.suite_batch) for frac in (clean, robust)]
    b_clean, b_robust = (nearest(batches, w) for w in wanted)
    per_chunk = chunk_size * (clean * cost[(b_clean, "apgd-ce")]
                              + robust * sum(cost[(b_robust, c)] for c in COMPONENTS[1:]))
    chunks = math.ceil(args.points / chunk_size)
    how = " / ".join(f"{w:.0f} (as {b}{'*' if w > 1.5 * b else ''})" for w, b in zip(wanted, (b_clean, b_robust)))
    return math.ceil(chunks / gpus) * per_chunk, how


def report(args: argparse.Namespace, device: torch.device, rows: list[dict], notes: list[str]) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    kind = "GPU" if device.type == "cuda" else "CPU"
    lines = [f"# AutoAttack throughput per robust point ({kind})", "",
             f"Written by `python -m bench.eval_throughput {' '.join(sys.argv[1:])}`. Device: {device} ({where}), "
             f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s). Method: see the docstring of "
             "bench/eval_throughput.py (never-fooled points, standard budgets, random weights, one run each).", ""]
    if device.type != "cuda":
        lines += ["**CPU figures.** The GPU figures the issue asks for (WRN-34-10, C = 10 and 100, TF32 on/off, "
                  "torch.compile, an H100/H200) are **not measured**: no GPU was available in this session. "
                  "The CPU run keeps the script tested; its projection is for this CPU and this net only.", ""]
    lines += ["| arch | C | variant | batch | " + " | ".join(COMPONENTS) + " |", "|---" * (4 + len(COMPONENTS)) + "|"]
    keys = sorted({(r["C"], r["variant"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for c, variant, batch in keys:
        cells = [f"{r['s_per_point']:.4g}" for name in COMPONENTS for r in rows
                 if (r["C"], r["variant"], r["batch"], r["component"]) == (c, variant, batch, name)]
        lines.append(f"| {args.arch} | {c} | {variant} | {batch} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per point that stays robust; a point APGD-CE breaks costs only its APGD-CE column.", "",
              f"Projected AutoAttack standard on {args.points} points at the paper's accuracies (suite batch "
              f"{args.suite_batch}):", "",
              "| C | paper row (clean / AA) | variant | chunk size | batch: clean / robust | 1 device | 8 devices |",
              "|---|---|---|---|---|---|---|"]
    for c in sorted({r["C"] for r in rows}):
        preset, clean, robust = PAPER.get(c, PAPER[10])
        for variant in sorted({r["variant"] for r in rows if r["C"] == c}):
            for chunk_size in args.chunk_sizes:
                one, how = projection(rows, c, variant, args, chunk_size, 1)
                eight, _ = projection(rows, c, variant, args, chunk_size, 8)
                lines.append(f"| {c} | {preset} ({100 * clean:.2f} / {100 * robust:.2f}) | {variant} | {chunk_size} "
                             f"| {how} | {one / 3600:.2f} h | {eight / 3600:.2f} h |")
    lines += ["", "Batches: the points per batch the suite makes (clean-correct, then robust points of a chunk, at "
              "most the suite batch) and the measured batch size used for them; * marks a batch far above the "
              "sweep, where the projection overestimates (the cost per point falls with the batch). 8 devices: "
              "the chunks are dealt round robin, so the slowest device has ceil(chunks / 8) of them.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="tiny-cnn", help="wrn-34-10 on a GPU")
    p.add_argument("--num-classes", type=int, nargs="+", default=[10])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--compile", action="store_true", help="also torch.compile the model (if its flags stay equal)")
    p.add_argument("--points", type=int, default=10_000, help="points of the projection")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[DEFAULT_CHUNK_SIZE, 500])
    p.add_argument("--suite-batch", type=int, default=256, help="eval_autoattack.py --batch-size of the projection")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows, notes = measure(args, device)
    text = report(args, device, rows, notes)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
