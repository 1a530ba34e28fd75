"""What runs for each evaluation attack kind: a function ``run(ctx, spec, eps, idx, seed, state_path)``.

``ctx`` is the suite's runner (model, points, settings, warnings); ``idx`` are the points still
robust at this eps. A run function returns ``(broken, x_adv)``: a bool per attacked point and the
examples it found (the input where it found none). Attacks run in fp32 with the model in eval
mode and parameter grads off (the suite sets this up).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from core.threat import eps_text

if TYPE_CHECKING:
    from .results import SuiteSettings
    from .spec import AttackSpec


class RunContext(Protocol):
    """What a run function may use of the suite's runner."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    settings: "SuiteSettings"
    device: torch.device
    progress: bool

    def warn(self, message: str) -> None: ...

    def check_bound(self, spec: "AttackSpec", eps: float, x_adv: torch.Tensor, x: torch.Tensor) -> None: ...


RunFn = Callable[[RunContext, "AttackSpec", float, torch.Tensor, int, Optional[Path]],
                 tuple[torch.Tensor, torch.Tensor]]


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max predictions of ``model`` on ``x`` (on x's device), in batches."""
    device = model_device(model)
    out = [model(x[i:i + batch_size].to(device)).argmax(1).to(x.device) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def perturbation_norm(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample L-inf, L2 or L1 size of ``x_adv - x``."""
    from attacks.geometry import per_sample_norm

    return per_sample_norm(x_adv - x, norm)


def _bar(ctx: RunContext, spec: "AttackSpec", eps: float, total: int) -> tqdm:
    return tqdm(total=total, desc=f"{spec.name} {eps_text(eps, ctx.settings.norm)}", unit="img", leave=False,
                disable=not ctx.progress)


def run_iterative(ctx: RunContext, spec: "AttackSpec", eps: float, idx: torch.Tensor, seed: int,
                  state_path: Optional[Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD or CW on the points ``idx`` in batches. Each point's random start comes from ``seed`` and
    its index alone, so a point is attacked exactly as in a run over any other subset (the
    separate one-eps runs a multi-eps run replaces)."""
    from attacks import cw, indexed_random_start, pgd

    s, fn = ctx.settings, (pgd if spec.kind == "pgd" else cw)
    broken, advs = [], []
    with _bar(ctx, spec, eps, len(idx)) as bar:
        for i in range(0, len(idx), s.batch_size):
            part = idx[i:i + s.batch_size]
            xb, yb = ctx.x[part].to(ctx.device), ctx.y[part].to(ctx.device)
            start = indexed_random_start(xb, part, eps, s.norm, seed)
            x_adv = fn(ctx.model, xb, yb, eps=eps, step=s.step(eps), steps=spec.steps, norm=s.norm,
                       start=start).detach()
            pred = predict(ctx.model, x_adv, s.batch_size)
            ctx.check_bound(spec, eps, x_adv, xb)
            broken.append((pred != yb).cpu())
            advs.append(x_adv.cpu())
            bar.update(len(part))
    if not broken:
        return torch.zeros(0, dtype=torch.bool), ctx.x[:0].cpu()
    return torch.cat(broken), torch.cat(advs)


def run_autoattack(ctx: RunContext, spec: "AttackSpec", eps: float, idx: torch.Tensor, seed: int,
                   state_path: Optional[Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAttack (standard / plus / rand / custom list) on the points ``idx``; resumable through ``state_path``."""
    from attacks import autoattack

    s = ctx.settings
    if len(idx) == 0:
        return torch.zeros(0, dtype=torch.bool), ctx.x[:0].cpu()
    xs, ys = ctx.x[idx].to(ctx.device), ctx.y[idx].to(ctx.device)
    with _bar(ctx, spec, eps, len(idx)) as bar, _capture_autoattack_warnings() as messages:
        x_adv, robust = autoattack(ctx.model, xs, ys, eps=eps, norm=s.norm, version=spec.version,
                                   attacks=list(spec.components) or None, seed=seed,
                                   batch_size=s.batch_size, state_path=state_path, verbose=False)
        bar.update(len(idx))
    for message in messages:
        ctx.warn(f"AutoAttack ({spec.name} at {eps_text(eps, s.norm)}): {message}")
    broken = ~robust.bool().cpu()
    x_adv = x_adv.detach().cpu()
    ctx.check_bound(spec, eps, x_adv[broken], xs[broken].cpu())
    return broken, x_adv


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip())


@contextmanager
def _capture_autoattack_warnings() -> Iterator[list[str]]:
    """Collect AutoAttack's own checks (randomness, Square vs white-box, ...) logged as warnings."""
    logger = logging.getLogger("auto-attack")
    handler = _ListHandler()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
