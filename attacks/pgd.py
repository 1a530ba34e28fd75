"""Projected gradient attacks (L-inf, L2, L1) on any objective: PGD-CE, CW-K, TRADES-KL, GKL.

One loop serves training (TRADES start ``x + 0.001 * N(0, 1)``, objective closures built from natural
logits computed once, dtype left to the caller's autocast) and evaluation (uniform start in the ball,
restarts keeping the first adversarial example per sample). Every returned example lies inside the
closed eps ball around ``x`` and inside [0, 1] exactly, as checked in the input's own dtype and
against the Python float ``eps``. The norm-specific steps and projections are in :mod:`attacks.geometry`.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.threat import NORMS
from errors import UserError
from losses import kl_loss

from . import geometry
from .context import attack_mode
from .geometry import (  # noqa: F401  (API)
    ascent_direction,
    ball_noise,
    clip_exact,
    exactly_inside,
    project,
    uniform_ball_start,
)

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
RANDOM_STARTS = ("uniform", "trades", "none")
TRADES_START_STD = 0.001  # the released TRADES/GKL-AT scripts start from x + 0.001 * N(0, 1)


def ce_objective() -> Objective:
    """Per-sample cross-entropy ``CE(logits_adv, y)``."""
    def objective(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_adv, y, reduction="none")
    return objective


def cw_objective(kappa: float = 0.0) -> Objective:
    """Per-sample CW margin ``-max(z_y - max_{j != y} z_j + kappa, 0)`` (CW-K evaluation uses kappa = 0)."""
    def objective(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        correct = logits_adv.gather(1, y[:, None]).squeeze(1)
        is_label = F.one_hot(y, logits_adv.shape[1]).bool()
        best_other = logits_adv.masked_fill(is_label, float("-inf")).amax(dim=1)
        return -(correct - best_other + kappa).clamp(min=0)
    return objective


def kl_objective(logits_nat: torch.Tensor) -> Objective:
    """TRADES objective ``KL(softmax(logits_nat) || softmax(logits_adv))`` per sample (:func:`losses.kl_loss`,
    computed in float32 at least); ``logits_nat`` is constant."""
    logits_nat = logits_nat.detach()

    def objective(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return kl_loss(logits_nat, logits_adv, reduction="none")
    return objective


_NAMED_OBJECTIVES: dict[str, Callable[[], Objective]] = {"ce": ce_objective, "cw": cw_objective}


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
        norm: str = "Linf", objective: Union[str, Objective] = "ce", random_start: str = "uniform",
        restarts: int = 1, generator: Optional[torch.Generator] = None,
        check_range: bool = True, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Maximise ``objective`` (summed over the batch) within the ``norm`` ball of radius ``eps`` around ``x``.

    ``objective`` is ``"ce"``, ``"cw"`` (margin, kappa 0) or ``f(logits_adv, y) -> Tensor`` (scalar or
    per sample). ``random_start``: ``"uniform"`` in the ball, ``"trades"`` (``x + 0.001 N(0,1)``, not
    projected before the first step, as released) or ``"none"``. L-inf takes sign steps, L2
    normalised-gradient steps, L1 sparse steps (the sign of the largest 1% of the gradient's
    coordinates that the box lets move, L1 length ``step``), each followed by the projection onto
    the ball and [0, 1] (for L1 the exact Euclidean projection onto their intersection). With
    ``restarts > 1`` a sample keeps the first restart's example that fools the model and is not
    attacked again. Only the input gets gradients; the model's modes and parameter flags are
    restored. ``generator`` (on ``x.device``) makes random starts reproducible. ``check_range=False``
    skips the check that ``x`` lies in [0, 1] (one host-device sync; the trainer's inputs are known).
    ``start`` (shape of ``x``, e.g. from :func:`indexed_random_start`) replaces the random start: it
    is projected onto the ball and the attack begins there (``restarts`` must be 1).
    Returns ``x_adv`` with the dtype and device of ``x``.
    """
    objective_fn = _check_args(x, y, eps, step, steps, norm, objective, random_start, restarts, check_range)
    if start is not None and (start.shape != x.shape or restarts != 1):
        raise ValueError(f"start must have the shape of x {tuple(x.shape)} and restarts must be 1; got "
                         f"{tuple(start.shape)} and {restarts}")
    if eps == 0:
        return x.detach().clone()
    radius = geometry.radius(eps, x.dtype)
    with attack_mode(model), torch.enable_grad():
        if restarts == 1:
            return _attack_once(model, x, y, radius, step, steps, norm, objective_fn, random_start, generator,
                                start)
        return _attack_with_restarts(model, x, y, radius, step, steps, norm, objective_fn, random_start,
                                     restarts, generator)


def cw(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
       norm: str = "Linf", random_start: str = "uniform", restarts: int = 1,
       generator: Optional[torch.Generator] = None, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CW-K: PGD on the CW margin loss (kappa = 0) with the same steps and projections as :func:`pgd`."""
    return pgd(model, x, y, eps=eps, step=step, steps=steps, norm=norm, objective="cw",
               random_start=random_start, restarts=restarts, generator=generator, start=start)


def indexed_random_start(x: torch.Tensor, index: torch.Tensor, eps: float, norm: str, seed: int) -> torch.Tensor:
    """Uniform random starts in the ``norm`` ball, sample ``x[i]`` drawn from its own generator seeded
    by ``(seed, index[i])``: a point gets the same start whichever subset or batch it is attacked in
    (the evaluation suite's multi-eps runs rely on it). Drawn on the CPU, returned on ``x.device``."""
    starts = torch.empty(x.shape, dtype=torch.float32)
    for row, i in enumerate(index.tolist()):
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63 - 1))
        starts[row] = ball_noise(x.shape[1:], eps, norm, gen)
    return x + starts.to(device=x.device, dtype=x.dtype)


def _attack_once(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float, step: float, steps: int,
                 norm: str, objective_fn: Objective, random_start: str,
                 generator: Optional[torch.Generator], start: Optional[torch.Tensor] = None) -> torch.Tensor:
    x = x.detach()
    if norm == "Linf":  # ball and [0, 1] together are one box: a single clamp per step
        lower, upper = (x - radius).clamp_(min=0.0), (x + radius).clamp_(max=1.0)
    if start is not None:
        x_adv = project(start.detach().to(x.dtype), x, radius, norm)
    else:
        x_adv = _random_start(x, radius, norm, random_start, generator)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        value = objective_fn(model(x_adv), y).sum()
        (grad,) = torch.autograd.grad(value, x_adv)
        x_adv = x_adv.detach()
        if norm == "Linf":
            x_adv = torch.clamp(x_adv.add_(grad.sign_(), alpha=step), lower, upper)
        else:
            x_adv = project(x_adv + step * ascent_direction(grad, norm, x_adv), x, radius, norm)
    return exactly_inside(x_adv, x, radius, norm)


def _attack_with_restarts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float, step: float,
                          steps: int, norm: str, objective_fn: Objective, random_start: str, restarts: int,
                          generator: Optional[torch.Generator]) -> torch.Tensor:
    x_best = x.detach().clone()
    active = torch.arange(x.shape[0], device=x.device)
    for _ in range(restarts):
        x_run = _attack_once(model, x[active], y[active], radius, step, steps, norm, objective_fn,
                             random_start, generator)
        with torch.no_grad():
            fooled = model(x_run).argmax(dim=1) != y[active]
        x_best[active] = x_run  # fooled samples leave `active` below, so their example is final
        active = active[~fooled]
        if active.numel() == 0:
            break
    return x_best


def _random_start(x: torch.Tensor, radius: float, norm: str, kind: str,
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    if kind == "none":
        return x.clone()
    if kind == "trades":
        return x + TRADES_START_STD * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return uniform_ball_start(x, radius, norm, generator)


def _in_unit_range(x: torch.Tensor) -> bool:
    low, high = torch.aminmax(x.detach())
    return bool(low >= 0) and bool(high <= 1)


def _check_args(x: torch.Tensor, y: torch.Tensor, eps: float, step: float, steps: int, norm: str,
                objective: Union[str, Objective], random_start: str, restarts: int,
                check_range: bool = True) -> Objective:
    if norm not in NORMS:
        raise UserError(f"unknown attack norm {norm!r}; use one of {', '.join(NORMS)}")
    if random_start not in RANDOM_STARTS:
        raise UserError(f"unknown random_start {random_start!r}; use one of {', '.join(RANDOM_STARTS)}")
    if not eps >= 0 or not step >= 0:
        raise UserError(f"attack eps={eps} and step={step} must be >= 0; pass non-negative values")
    if int(steps) != steps or steps < 0 or int(restarts) != restarts or restarts < 1:
        raise UserError(f"attack steps={steps} must be an integer >= 0 and restarts={restarts} >= 1")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"attack got {x.shape[0]} images but {y.shape[0]} labels; pass matching batches")
    if check_range and x.numel() and not _in_unit_range(x):  # costs a host-device sync
        raise UserError("attack inputs must lie in [0, 1]; move normalisation into the model")
    if callable(objective):
        return objective
    if objective not in _NAMED_OBJECTIVES:
        raise UserError(f"unknown attack objective {objective!r}; use 'ce', 'cw' or a callable")
    return _NAMED_OBJECTIVES[objective]()
