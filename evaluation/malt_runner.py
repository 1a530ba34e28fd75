"""The ``malt`` evaluation attack: its names, its entry in :data:`evaluation.spec.ATTACKS` and its run function.

Names: ``malt`` (k=3 targets of all other classes, at most 100, targeted APGD at 100 iterations)
or ``malt:k=K,testk=T,iters=N`` with any of the three options. The canonical name lists only the
options that differ from the defaults, in that order (``malt:k=3`` is ``malt``). Chunks, seeds,
sharding and resume are the suite's, as for AutoAttack: the run function gets the chunk's seed
and state file (the attack saves its progress after each target rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from attacks.malt import APGD_ITERATIONS, DEFAULT_K, MAX_TESTK, check_malt, default_testk, malt
from core.threat import eps_text
from errors import UserError

from .runners import RunContext, _capture_autoattack_warnings
from .spec import AttackSpec, EvalAttack, register

FORMS = "malt, malt:k=K,testk=T,iters=N (MALT-targeted APGD)"
_OPTIONS = ("k", "testk", "iters")


@dataclass(frozen=True)
class MaltOptions:
    """``k`` targets of the ``testk`` highest-logit classes (None: all, at most 100), ``iters`` APGD steps."""

    k: int = DEFAULT_K
    testk: Optional[int] = None
    iters: int = APGD_ITERATIONS

    @property
    def name(self) -> str:
        """The canonical attack name: ``malt`` plus the options that differ from the defaults."""
        default = MaltOptions()
        parts = [f"{key}={getattr(self, key)}" for key in _OPTIONS if getattr(self, key) != getattr(default, key)]
        return "malt:" + ",".join(parts) if parts else "malt"


def malt_options(text: str, name: Optional[str] = None) -> MaltOptions:
    """Read ``malt`` or ``malt:k=K,testk=T,iters=N``; a bad option is a ``UserError`` naming the fix."""
    shown = name or text
    values: dict[str, int] = {}
    for item in (p.strip() for p in text.partition(":")[2].split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if key not in _OPTIONS or not sep:
            raise UserError(f"unknown MALT option {item!r} in {shown!r}; use malt:k=K,testk=T,iters=N "
                            f"(defaults k={DEFAULT_K}, testk all other classes up to {MAX_TESTK}, "
                            f"iters={APGD_ITERATIONS})")
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"MALT option {key} in {shown!r} must be a positive integer, got {value!r}")
        values[key] = int(value)
    options = MaltOptions(**values)
    if options.testk is not None and options.k > options.testk:
        raise UserError(f"{shown!r} attacks k={options.k} targets out of testk={options.testk} candidates: "
                        "k may be at most testk")
    return options


def _parse(text: str, name: str) -> Optional[AttackSpec]:
    if text != "malt" and not text.startswith("malt:"):
        return None
    return AttackSpec(malt_options(text, name).name, "malt")


def _label(spec: AttackSpec) -> str:
    return "MALT" if spec.name == "malt" else f"MALT({spec.name.partition(':')[2]})"


def run_malt(ctx: RunContext, spec: AttackSpec, eps: float, idx: torch.Tensor, seed: int,
             state_path: Optional[Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MALT on the points ``idx`` (per-point starts from the chunk's ``seed``); resumable through ``state_path``."""
    s, options = ctx.settings, malt_options(spec.name)
    with torch.no_grad():  # every process checks, also one with no point left to attack
        num_classes = int(ctx.model(ctx.x[:1].to(ctx.device)).shape[1])
    check_malt(num_classes, options.k, options.testk or default_testk(num_classes), s.norm)
    if len(idx) == 0:
        return torch.zeros(0, dtype=torch.bool), ctx.x[:0].cpu()
    xs, ys = ctx.x[idx].to(ctx.device), ctx.y[idx].to(ctx.device)
    with _capture_autoattack_warnings() as messages:
        result = malt(ctx.model, xs, ys, eps=eps, norm=s.norm, k=options.k, testk=options.testk,
                      n_iter=options.iters, seed=seed, batch_size=s.batch_size, index=idx.cpu(), state_path=state_path)
    for message in messages:
        ctx.warn(f"MALT ({spec.name} at {eps_text(eps, s.norm)}): {message}")
    broken = ~result.robust.cpu()
    x_adv = result.x_adv.detach().cpu()
    ctx.check_bound(spec, eps, x_adv[broken], xs[broken].cpu())
    return broken, x_adv


MALT = register(EvalAttack(
    "malt", FORMS, _parse, _label, "autoattack", lambda s: True, run_malt, examples=("malt", "malt:k=5,testk=20"),
    rule="MALT: targeted APGD (AutoAttack's, DLR-targeted loss, 1 restart per target) on the k classes of nearest "
         "linearised boundary among the testk highest logits, each point until its first success, per chunk of "
         "{chunk_size} points with a seed per chunk"))
