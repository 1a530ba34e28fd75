"""What runs for each evaluation attack kind: a function ``run(ctx, spec, eps, idx, seed, state_path)``.

``ctx`` is the suite's runner (model, points, settings, warnings); ``idx`` are the points still
robust at this eps. A run function returns ``(broken, x_adv)``: a bool per attacked point and the
examples it found (the input where it found none). Attacks run in fp32 with the model in eval
mode and parameter grads off (the suite sets this up). Each kind of :data:`evaluation.spec.ATTACKS`
names its own run function; this module imports nothing of the suite (what it reads of the suite's
objects is spelled out by the protocols below), so the table can import it without a circle.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from attacks import autoattack, cw, indexed_random_start, pgd
from attacks.geometry import per_sample_norm
from core.threat import eps_text


class AttackRequest(Protocol):
    """What a run function reads of the attack it runs (an :class:`evaluation.spec.AttackSpec`)."""

    @property
    def name(self) -> str: ...

    @property
    def steps(self) -> int: ...

    @property
    def version(self) -> str: ...

    @property
    def components(self) -> tuple[str, ...]: ...


class RunSettings(Protocol):
    """What a run function reads of the suite's settings (:class:`evaluation.results.SuiteSettings`)."""

    @property
    def norm(self) -> str: ...

    @property
    def batch_size(self) -> int: ...

    def step(self, eps: float) -> float: ...


class RunContext(Protocol):
    """What a run function may use of the suite's runner."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    settings: RunSettings
    device: torch.device
    progress: bool

    def warn(self, message: str) -> None: ...

    def check_bound(self, spec: AttackRequest, eps: float, x_adv: torch.Tensor, x: torch.Tensor) -> None: ...


RunFn = Callable[[RunContext, AttackRequest, float, torch.Tensor, int, Optional[Path]],
                 tuple[torch.Tensor, torch.Tensor]]
# an iterative attack as attacks.pgd / attacks.cw: (model, x, y, *, eps, step, steps, norm, start) -> x_adv
IterativeAttack = Callable[..., torch.Tensor]


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
    return per_sample_norm(x_adv - x, norm)


def _bar(ctx: RunContext, spec: AttackRequest, eps: float, total: int) -> tqdm:
    return tqdm(total=total, desc=f"{spec.name} {eps_text(eps, ctx.settings.norm)}", unit="img", leave=False,
                disable=not ctx.progress)


def iterative_runner(attack: IterativeAttack) -> RunFn:
    """The run function of an iterative attack (``attacks.pgd``, ``attacks.cw``): ``spec.steps`` steps of
    ``settings.step(eps)`` on the points ``idx`` in batches. Each point's random start comes from
    ``seed`` and its index alone, so a point is attacked exactly as in a run over any other subset
    (the separate one-eps runs a multi-eps run replaces)."""
    def run(ctx: RunContext, spec: AttackRequest, eps: float, idx: torch.Tensor, seed: int,
            state_path: Optional[Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
        s = ctx.settings
        broken, advs = [], []
        with _bar(ctx, spec, eps, len(idx)) as bar:
            for i in range(0, len(idx), s.batch_size):
                part = idx[i:i + s.batch_size]
                xb, yb = ctx.x[part].to(ctx.device), ctx.y[part].to(ctx.device)
                start = indexed_random_start(xb, part, eps, s.norm, seed)
                x_adv = attack(ctx.model, xb, yb, eps=eps, step=s.step(eps), steps=spec.steps, norm=s.norm,
                               start=start).detach()
                pred = predict(ctx.model, x_adv, s.batch_size)
                ctx.check_bound(spec, eps, x_adv, xb)
                broken.append((pred != yb).cpu())
                advs.append(x_adv.cpu())
                bar.update(len(part))
        if not broken:
            return torch.zeros(0, dtype=torch.bool), ctx.x[:0].cpu()
        return torch.cat(broken), torch.cat(advs)
    return run


run_pgd = iterative_runner(pgd)
run_cw = iterative_runner(cw)


def run_autoattack(ctx: RunContext, spec: AttackRequest, eps: float, idx: torch.Tensor, seed: int,
                   state_path: Optional[Path] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoAttack (standard / plus / rand / custom list) on the points ``idx``; resumable through ``state_path``."""
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
