"""Schedules as pure functions of the epoch (and step): nothing to save for resume.

Epochs are 1-based, as in the spec: epoch e of E.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence


class AttackBudget(NamedTuple):
    eps: float
    steps: int
    step_size: float


def eps_at_epoch(eps: float, epoch: int, epochs: int, schedule: str = "linear") -> float:
    """``linear``: eps * e / E (the released scripts); ``constant``: eps."""
    if schedule == "constant":
        return eps
    if schedule == "linear":
        return eps * epoch / epochs
    raise ValueError(f"unknown eps schedule {schedule!r}")


def attack_budget(eps: float, epoch: int, epochs: int, *, eps_schedule: str = "linear",
                  budget: str = "effective", steps: int = 10, step_size: float = 2 / 255) -> AttackBudget:
    """Radius, step count and step size of the training attack at ``epoch``.

    ``effective``: K=5, step eps_t/2 every epoch (what the released scripts run: their four
    ``if`` without ``elif`` leave the last stage in force). ``staged``: the intended stages
    (K=2 step eps_t; K=3 step 2eps_t/3; K=4 step eps_t/2; K=5 step eps_t/2 by quarters).
    ``low``: K=2, step eps_t. ``fixed``: ``steps`` and ``step_size`` as given (classic TRADES).
    """
    eps_t = eps_at_epoch(eps, epoch, epochs, eps_schedule)
    if budget == "effective":
        return AttackBudget(eps_t, 5, eps_t / 2)
    if budget == "low":
        return AttackBudget(eps_t, 2, eps_t)
    if budget == "fixed":
        return AttackBudget(eps_t, steps, step_size)
    if budget == "staged":
        if epoch <= epochs / 4:
            return AttackBudget(eps_t, 2, eps_t)
        if epoch <= epochs / 2:
            return AttackBudget(eps_t, 3, 2 * eps_t / 3)
        if epoch <= 3 * epochs / 4:
            return AttackBudget(eps_t, 4, eps_t / 2)
        return AttackBudget(eps_t, 5, eps_t / 2)
    raise ValueError(f"unknown attack budget {budget!r}")


# torch.optim.lr_scheduler.OneCycleLR's defaults, which DM-AT's "cosinew" scheduler keeps
ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_MOMENTUM = 25.0, 1e4, (0.85, 0.95)
LR_FORMULAS = {
    "cosine-epoch": "lr * 0.5 * (1 + cos(pi * (e - w) / (E - w + 1))), linear warm-up lr * e / w (DKL scripts)",
    "cosine-step": "the cosine-epoch curve at the fractional epoch, updated every step",
    "cosine-trades": "lr * 0.5 * (1 + cos(pi * (e - 1 - w) / (E - w))), linear warm-up lr * e / w "
                     "(train_trades_cifar.py)",
    "onecycle": "OneCycleLR per epoch: cosine from lr/25 up to lr over w epochs, then down to lr/25/1e4; momentum "
                "0.95 -> 0.85 -> 0.95 (DM-AT's cosinew)",
    "step": "lr * decay**k from the k-th milestone epoch on",
    "constant": "lr",
}


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))


def _onecycle(k: int, epochs: int, warmup_epochs: int, up: tuple[float, float], down: tuple[float, float]) -> float:
    """OneCycleLR's two cosine phases at scheduler step ``k`` (0-based): ``up`` = (start, peak) over
    the first ``warmup_epochs`` steps, then ``down`` = (peak, end) until step ``epochs - 1``."""
    up_end = float(warmup_epochs) - 1
    if k <= up_end:  # torch divides 0 by 0 for a one-epoch warm-up; its first step is then the peak
        return _cos_anneal(*up, k / up_end) if up_end > 0 else up[1]
    return _cos_anneal(*down, (k - up_end) / (epochs - 1 - up_end))


def lr_at(lr: float, epoch: int, epochs: int, *, schedule: str = "cosine-epoch", warmup_epochs: int = 0,
          step: int = 0, steps_per_epoch: int = 1, milestones: Sequence[int] = (), decay: float = 0.1) -> float:
    """Learning rate for ``step`` (0-based) of ``epoch`` (1-based).

    ``cosine-epoch`` (released scripts): lr * 0.5 * (1 + cos(pi * (e - w) / (E - w + 1))), constant
    within an epoch, linear warm-up lr * e / w for e <= w. ``cosine-step``: the same curve evaluated
    at the fractional epoch, so it changes every step. ``cosine-trades`` (the released
    ``train_trades_cifar.py``): lr * 0.5 * (1 + cos(pi * (e - 1 - w) / (E - w))), which starts at lr
    and is 0 only after the last epoch. ``onecycle`` (DM-AT's ``cosinew``: ``OneCycleLR`` with
    ``pct_start`` w / E, stepped once per epoch). ``step``: lr * decay**k from the k-th of the
    ``milestones`` epochs on (``decay`` 0.1 at 75 and 90: the MART / TRADES piecewise schedule).
    ``constant``: lr.
    """
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * decay ** sum(1 for m in milestones if epoch >= m)
    if schedule == "onecycle":
        low = lr / ONECYCLE_DIV
        return _onecycle(epoch - 1, epochs, warmup_epochs, (low, lr), (lr, low / ONECYCLE_FINAL_DIV))
    if schedule == "cosine-trades":
        w = warmup_epochs
        if w > 0 and epoch <= w:
            return lr * epoch / w
        return lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1 - w) / (epochs - w)))
    if schedule == "cosine-epoch":
        t = float(epoch)
    elif schedule == "cosine-step":
        t = epoch - 1 + (step + 1) / steps_per_epoch
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    w = warmup_epochs
    if w > 0 and t <= w:
        return lr * t / w
    return lr * 0.5 * (1 + math.cos(math.pi * (t - w) / (epochs - w + 1)))


def config_lr(cfg, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """:func:`lr_at` with the schedule settings of a run's config."""
    return lr_at(cfg.lr, epoch, cfg.epochs, schedule=cfg.lr_schedule, warmup_epochs=cfg.warmup_epochs, step=step,
                 steps_per_epoch=steps_per_epoch, milestones=cfg.lr_milestones, decay=cfg.lr_decay)


def config_momentum(cfg, epoch: int) -> float | None:
    """The SGD momentum of ``epoch`` when the lr schedule cycles it (``onecycle``), else None (``--momentum``)."""
    if cfg.lr_schedule != "onecycle":
        return None
    base, peak = ONECYCLE_MOMENTUM
    return _onecycle(epoch - 1, cfg.epochs, cfg.warmup_epochs, (peak, base), (base, peak))


def lr_formula(cfg) -> str:
    """One line naming the run's lr schedule and its formula, for ``--print-schedule``."""
    return f"lr schedule {cfg.lr_schedule}: {LR_FORMULAS[cfg.lr_schedule]} (lr {cfg.lr:g}, w {cfg.warmup_epochs}, " \
           f"E {cfg.epochs})"


def schedule_table(cfg, epochs_to_show: list[int] | None = None) -> list[dict]:
    """Rows of (epoch, eps_t, K, step, lr[, momentum]) for printing and tests."""
    E = cfg.epochs
    shown = epochs_to_show or sorted({1, max(1, E // 4), E // 4 + 1, max(1, E // 2), max(1, 3 * E // 4), E})
    rows = []
    for e in shown:
        b = attack_budget(cfg.eps, e, E, eps_schedule=cfg.eps_schedule, budget=cfg.attack_budget,
                          steps=cfg.attack_steps, step_size=cfg.attack_step_size)
        rows.append({"epoch": e, "eps_x255": b.eps * 255, "steps": b.steps, "step_x255": b.step_size * 255,
                     "lr": config_lr(cfg, e),
                     "awp": cfg.awp_gamma > 0 and e >= cfg.awp_warmup})
        if cfg.lr_schedule == "onecycle":
            rows[-1]["momentum"] = config_momentum(cfg, e)
    return rows
