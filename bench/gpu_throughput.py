"""Benchmark: images/s and model FLOPs utilisation of the GKL-AT training step on one GPU.

Run: ``python -m bench.gpu_throughput`` (on a CUDA machine; writes bench/results/gpu_throughput.md).

The step is ``training.engine.training_step`` itself (natural forward, K-step PGD on the GKL objective,
AWP proxy step, adversarial + natural forwards, backward, fused SGD, AWP restore, bank update)
on WRN-34-10, C = 100, batch 128, K = 5, AWP on, one fixed batch already on the GPU (data loading
is not timed). Variants, each in a fresh trainer:

- ``fp32``: eager, fp32 with TF32 off (plain IEEE fp32 matmuls and convolutions);
- ``tf32``: eager, fp32 tensors with TF32 matmuls/convolutions (what the trainer does with ``--amp off``);
- ``bf16-cl``: bf16 autocast + channels_last (the trainer's CUDA default);
- ``bf16-cl-compile``: the same plus ``--compile`` (compile time is reported separately).

Time: wall clock over ``--steps`` steps after ``--warmup`` steps, with a device synchronisation
before and after. FLOPs per step are counted over one step with ``torch.utils.flop_counter``'s formulas
(``train_step.step_flops``) (matmuls and convolutions, forward and backward, as executed: the attack's backward passes
compute input gradients only). MFU = FLOPs per step / step time / the device's dense peak for the
variant's arithmetic (given with ``--peak-tflops`` or looked up from the device name).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from bench.train_step import step_flops, synthetic_step
from training.config import TrainConfig

# Dense (no sparsity) peaks in TFLOP/s from NVIDIA's data sheets: (fp32, tf32, bf16).
PEAKS = {"H100 80GB HBM3": (66.9, 494.7, 989.4),  # H100 SXM5
         "H100 PCIe": (51.2, 378.0, 756.0),
         "H200": (66.9, 494.7, 989.4)}
VARIANTS = {
    "fp32": dict(amp="off", channels_last=False, compile=False, tf32=False),
    "tf32": dict(amp="off", channels_last=False, compile=False, tf32=True),
    "bf16-cl": dict(amp="bf16", channels_last=True, compile=False, tf32=True),
    "bf16-cl-compile": dict(amp="bf16", channels_last=True, compile=True, tf32=True),
    "bf16-cl-compile-graphs": dict(amp="bf16", channels_last=True, compile=True, tf32=True,
                                   compile_mode="reduce-overhead"),
}


def variant_config(args: argparse.Namespace, variant: dict) -> TrainConfig:
    return TrainConfig(dataset="cifar100", arch=args.arch, batch_size=args.batch, loss="gkl", eps=8 / 255,
                      attack_budget="fixed", attack_steps=args.steps_k, attack_step_size=2 / 255,
                      awp_gamma=0.005, awp_warmup=0, averaging="epoch-ema", device="cuda",
                      amp=variant["amp"], channels_last=variant["channels_last"],
                      compile=variant["compile"], compile_mode=variant.get("compile_mode", "default")).validate()


def make_step(args: argparse.Namespace, variant: dict, seed: int = 0):
    """``step(x, y)`` of a fresh model for ``variant`` (see ``bench.train_step.synthetic_step``)."""
    cfg = variant_config(args, variant)
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = variant["tf32"]
    torch.backends.cudnn.allow_tf32 = variant["tf32"]
    torch.backends.cudnn.benchmark = True
    m, step = synthetic_step(cfg, torch.device("cuda"))
    step.modules = m
    return step


def weight_agreement(args: argparse.Namespace, steps: int) -> float:
    """Largest relative weight difference after ``steps`` steps: fp32 eager vs fp32 compiled with CUDA graphs."""
    fast = dict(VARIANTS["fp32"], compile=True, compile_mode="reduce-overhead")
    weights = []
    for variant in (VARIANTS["fp32"], fast):
        step = make_step(args, variant)
        x, y = batch_for(args, variant)
        torch.manual_seed(1)
        for _ in range(steps):
            step(x, y)
        weights.append([p.detach().float().clone() for p in step.modules.model.parameters()])
        del step
        torch.cuda.empty_cache()
    return max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item() for a, b in zip(*weights))


def batch_for(args: argparse.Namespace, variant: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32, generator=g).cuda()
    y = torch.randint(0, 100, (args.batch,), generator=g).cuda()
    if variant["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def time_variant(args: argparse.Namespace, name: str) -> dict:
    variant = VARIANTS[name]
    step = make_step(args, variant)
    x, y = batch_for(args, variant)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step(x, y)  # first step: cudnn autotuning, compilation
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(args.warmup):
        step(x, y)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        sums = step(x, y)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    loss = (sums[0] / sums[-1]).item()
    out = {"variant": name, "step_s": elapsed / args.steps, "images_s": args.steps * args.batch / elapsed,
           "first_step_s": first, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss}
    print(f"{name:>16}: {out['images_s']:8.1f} img/s  {1000 * out['step_s']:7.1f} ms/step  first step "
          f"{first:6.1f} s  peak {out['peak_gib']:.1f} GiB  loss {loss:.3f}", flush=True)
    del step
    torch.cuda.empty_cache()
    return out


def peaks_for(device_name: str, override: float | None) -> tuple[float, float, float]:
    if override:
        return override / 15, override / 2, override
    for key, peaks in PEAKS.items():
        if key in device_name:
            return peaks
    raise SystemExit(f"no peak figures for {device_name!r}: pass --peak-tflops (dense bf16)")


def report(args: argparse.Namespace, rows: list[dict], flops: int, device: str, peaks: tuple) -> str:
    base = next((r for r in rows if r["variant"] == "fp32"), rows[0])
    peak_of = {"fp32": peaks[0], "tf32": peaks[1]}
    lines = [f"## `python -m bench.gpu_throughput {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
             f"cuDNN {torch.backends.cudnn.version()}; Python {platform.python_version()}.",
             f"Step: {args.arch}, C=100, batch {args.batch}, K={args.steps_k} + AWP, GKL-AT; "
             f"{args.steps} timed steps after {args.warmup} warm-up steps.",
             f"FLOPs per step (flop_counter formulas, matmul + conv, fwd + bwd): {flops / 1e12:.2f} TFLOP "
             f"({flops / args.batch / 1e9:.1f} GFLOP per image).",
             f"Dense peaks used for MFU (TFLOP/s): fp32 {peaks[0]}, tf32 {peaks[1]}, bf16 {peaks[2]}.", "",
             "| variant | images/s | ms/step | speed-up vs fp32 | achieved TFLOP/s | MFU (own peak) | "
             "MFU vs bf16 peak | first step s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        achieved = flops / r["step_s"] / 1e12
        own = peak_of.get(r["variant"], peaks[2])
        lines.append(f"| {r['variant']} | {r['images_s']:.1f} | {1000 * r['step_s']:.1f} | "
                     f"{r['images_s'] / base['images_s']:.2f}x | {achieved:.1f} | {100 * achieved / own:.1f}% | "
                     f"{100 * achieved / peaks[2]:.1f}% | {r['first_step_s']:.1f} | {r['peak_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wrn-34-10")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps-k", type=int, default=5, help="PGD steps of the training attack")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_throughput.md"))
    p.add_argument("--check-steps", type=int, default=20, help="steps of the fp32 eager vs compiled weight check (0: skip)")
    p.add_argument("--profile", action="store_true", help="add the per-phase breakdown and the sync count (bf16-cl)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("python -m bench.gpu_throughput needs a CUDA device")
    device = torch.cuda.get_device_name()
    peaks = peaks_for(device, args.peak_tflops)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: choose from {', '.join(VARIANTS)}")
    step = make_step(args, VARIANTS["tf32"])
    x, y = batch_for(args, VARIANTS["tf32"])
    flops = step_flops(lambda: step(x, y))
    step = None  # free the GPU memory before the timed variants
    print(f"{device}: {flops / 1e12:.2f} TFLOP per step", flush=True)
    rows = []
    for name in names:
        try:
            rows.append(time_variant(args, name))
        except Exception:  # one failing variant (e.g. compilation) must not lose the others' figures
            traceback.print_exc()
            print(f"{name}: FAILED (traceback above)", flush=True)
    if not rows:
        raise SystemExit("every variant failed")
    text = report(args, rows, flops, device, peaks)
    if args.check_steps:
        diff = weight_agreement(args, args.check_steps)
        text += (f"\nfp32 eager vs fp32 compiled (reduce-overhead) after {args.check_steps} steps: largest relative "
                 f"weight difference {diff:.2e} (target <= 1e-4: {'met' if diff <= 1e-4 else 'NOT met'}).\n")
    if args.profile:
        from bench.step_profile import profile, table

        cfg = variant_config(args, VARIANTS["bf16-cl"])
        phases, total, syncs = profile(cfg, torch.device("cuda"), args.steps, args.warmup)
        text += ("\nPer-phase breakdown of the default CUDA path (bf16 + channels_last, eager), CUDA events:\n\n"
                 + table(phases, total, args.batch)
                 + f"\n\nHost-device syncs in one step: {len(syncs)} ({', '.join(syncs) or 'none'}).\n")
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "" if out.exists() else "# GKL-AT training step on one GPU: fp32 vs bf16 + channels_last vs + compile\n\n"
    with open(out, "a") as f:
        f.write(header + text + "\n")


if __name__ == "__main__":
    main()
