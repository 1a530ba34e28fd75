"""Benchmark: one GKL-AT training step of this project vs a step with the released code's structure.

Run: ``.venv/bin/python -m bench.train_step`` (CPU, fp32, one process; writes bench/results/train_step.md).

Both steps train the same network (WRN-16-4, C = 100) on the same batch (B = 64) with K = 5 PGD
steps on the GKL objective, AWP on, GKL-AT training loss, SGD with momentum and weight decay, and
a score-bank update. They differ only in how the work is organised:

- project: ``training.engine.training_step`` (natural logits computed once before the attack; O(B*C) wMSE;
  one AWP proxy built once and refreshed in place with foreach copies);
- released structure: natural logits recomputed at every attack step, the pairwise B x C x C wMSE
  (attack objective and training loss), the AWP proxy refreshed by ``load_state_dict(model.state_dict())``
  and the perturbation computed and applied by per-key loops over state dicts.

Both start from identical weights and RNG state; the first step's losses must agree (a check that
the baseline computes the same step). Time: the minimum wall time of a step over ``--steps`` timed
steps per side after one warm-up step, the two sides interleaved so that machine load hits both.
FLOPs per step (matmul + conv, forward and backward, as executed) from ``torch.utils.flop_counter``'s
formulas (:class:`FlopCount`).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from data import NUM_CLASSES
from training import engine
from training.config import TrainConfig
from training.schedules import attack_budget

AWP_GAMMA = 0.005


def synthetic_step(cfg: TrainConfig, device: torch.device, distributed: bool = False
                   ) -> tuple[engine.StepModules, Callable[..., torch.Tensor]]:
    """The step modules of ``cfg`` (no dataset) and ``step(x, y) -> metric sums`` running epoch 1's step."""
    m = engine.build_step(cfg, NUM_CLASSES[cfg.dataset], device, amp=cfg.amp == "bf16", distributed=distributed)
    budget = attack_budget(cfg.eps, 1, cfg.epochs, eps_schedule=cfg.eps_schedule, budget=cfg.attack_budget,
                           steps=cfg.attack_steps, step_size=cfg.attack_step_size)
    count = [0]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        return engine.training_step(m, x, y, budget=budget, lr=cfg.lr, awp_on=cfg.awp_warmup <= 1, step=count[0])
    return m, step


def pairwise_gkl(o_m: torch.Tensor, o_n: torch.Tensor, v: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """GKL with the B x C x C pairwise differences, normalised by the batch weight sum (released form)."""
    w = v[:, :, None] * v[:, None, :]
    dm = o_m[:, :, None] - o_m[:, None, :]
    dn = o_n[:, :, None] - o_n[:, None, :]
    wmse = (w * (dm - dn).pow(2)).sum() / w.sum()
    soft_ce = -(F.softmax(o_m.detach(), 1) * F.log_softmax(o_n, 1)).sum(1).mean()
    return alpha / 4 * wmse + beta * soft_ce


class ReleasedStyleStep:
    """The same GKL-AT step organised as the released scripts do (see the module docstring)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.model, self.cfg = model, cfg
        self.proxy = copy.deepcopy(model)
        self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=cfg.lr)
        self.opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        c = model.fc.out_features
        self.bank_acc = torch.zeros(c, c, dtype=torch.float64)

    def attack(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cfg, model = self.cfg, self.model
        model.eval()
        x_adv = x + 0.001 * torch.randn_like(x)
        for _ in range(cfg.attack_steps):
            x_adv.requires_grad_()
            loss = pairwise_gkl(model(x), model(x_adv), v, 1.0, 1.0)
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = x_adv.detach() + cfg.attack_step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - cfg.eps), x + cfg.eps).clamp(0.0, 1.0)
        return x_adv.detach()

    def perturb(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> dict:
        cfg = self.cfg
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        o_adv, o_nat = self.proxy(x_adv), self.proxy(x)
        loss = -(F.cross_entropy(o_nat, y) + pairwise_gkl(o_nat, o_adv, v, cfg.gkl_wmse_weight, cfg.gkl_ce_weight))
        self.proxy_opt.zero_grad()
        loss.backward()
        self.proxy_opt.step()
        diff = {}
        for (key, w), (_, w_proxy) in zip(self.model.state_dict().items(), self.proxy.state_dict().items()):
            if w.dim() > 1 and "weight" in key:
                delta = w_proxy - w
                diff[key] = w.norm() / (delta.norm() + 1e-20) * delta
        self._add(diff, AWP_GAMMA)
        return diff

    def _add(self, diff: dict, coeff: float) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in diff:
                    param.add_(coeff * diff[name])

    def step(self, x: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, lr: float) -> torch.Tensor:
        cfg = self.cfg
        x_adv = self.attack(x, scores)
        v = scores.pow(cfg.gkl_weight_exponent)
        diff = self.perturb(x, x_adv, y, v)
        self.model.train()
        o_adv, o_nat = self.model(x_adv), self.model(x)
        loss = F.cross_entropy(o_nat, y) + pairwise_gkl(o_nat, o_adv, v, cfg.gkl_wmse_weight, cfg.gkl_ce_weight)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self._add(diff, -AWP_GAMMA)
        probs = F.softmax(o_nat.detach().double() / cfg.tau, 1)
        self.bank_acc.index_add_(0, y, probs)
        return loss.detach()


def bench_config(arch: str, batch: int, k: int) -> TrainConfig:
    return TrainConfig(dataset="cifar100", arch=arch, batch_size=batch, loss="gkl", eps=8 / 255,
                       attack_budget="fixed", attack_steps=k, attack_step_size=2 / 255, awp_gamma=AWP_GAMMA,
                       awp_warmup=0, averaging="epoch-ema", device="cpu", amp="off", channels_last=False,
                       compile=False).validate()


class FlopCount(TorchDispatchMode):
    """Sums the FLOPs of every matmul/convolution (forward and backward) dispatched inside it.

    Uses ``torch.utils.flop_counter``'s formulas without ``FlopCounterMode``'s module tracker,
    whose hooks fail under ``torch.autograd.grad`` with respect to a leaf input (the attack).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(fn) -> int:
    """FLOPs of matmuls and convolutions executed by ``fn()``."""
    with FlopCount() as counter:
        fn()
    return counter.total


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    cfg = bench_config(args.arch, args.batch, args.k)
    m, step = synthetic_step(cfg, torch.device("cpu"))
    baseline = ReleasedStyleStep(copy.deepcopy(m.model), cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, m.num_classes, (args.batch,), generator=g)
    scores = m.bank.weights(y)

    def ours() -> float:
        sums = step(x, y)
        return (sums[0] / sums[-1]).item()

    def theirs() -> float:
        return baseline.step(x, y, scores, cfg.lr).item()

    torch.manual_seed(2)
    loss_ours = ours()
    torch.manual_seed(2)
    loss_theirs = theirs()
    if abs(loss_ours - loss_theirs) > 1e-3 * abs(loss_theirs):
        raise AssertionError(f"the two steps disagree: loss {loss_ours} vs {loss_theirs}")
    flops = {"project": step_flops(ours), "released": step_flops(theirs)}
    times: dict[str, list[float]] = {"project": [], "released": []}
    for _ in range(args.steps):
        for name, fn in (("project", ours), ("released", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    return {"loss": (loss_ours, loss_theirs), "flops": flops, "best": best, "times": times,
            "ratio": best["released"] / best["project"]}


def report(args: argparse.Namespace, r: dict) -> str:
    lines = [f"## `python -m bench.train_step {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), fp32, load average at the end "
             f"{os.getloadavg()[0]:.1f}. Step: {args.arch}, C=100, B={args.batch}, K={args.k}, AWP on.",
             f"First-step losses: project {r['loss'][0]:.5f}, released structure {r['loss'][1]:.5f}.", "",
             "| step | best s/step | images/s | all step times s | GFLOP/step |", "|---|---|---|---|---|"]
    for name in ("project", "released"):
        t = r["best"][name]
        lines.append(f"| {name} | {t:.2f} | {args.batch / t:.1f} | "
                     f"{', '.join(f'{v:.2f}' for v in r['times'][name])} | {r['flops'][name] / 1e9:.0f} |")
    lines += ["", f"Speed-up (released / project time): **{r['ratio']:.2f}x**; FLOP ratio "
              f"{r['flops']['released'] / r['flops']['project']:.2f}x."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wrn-16-4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=5, help="PGD steps of the training attack")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train_step.md"))
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    text = report(args, run(args))
    print(text)
    out = Path(args.out)
    header = "# GKL-AT training step: project vs the released code's structure (CPU, fp32)\n\n"
    if args.append and out.exists():
        with open(out, "a") as f:
            f.write("\n" + text)
    else:
        out.write_text(header + text)


if __name__ == "__main__":
    main()
