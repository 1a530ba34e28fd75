"""MALT targeting (Melamed, Yehudai, Shamir, "MALT Powers Up Adversarial Attacks", NeurIPS 2024).

For each point the ``testk`` highest-logit other classes are ranked by a linear estimate of the
distance to their decision boundary: the radius at which the linearised margin ``z_y - z_j``
reaches zero, ``(z_y - z_j) / ||grad_x (z_y - z_j)||_*`` with the dual norm (L1 for L-inf, L2 for
L2). The ``k`` classes with the smallest estimate are attacked in that order with AutoAttack's own
targeted APGD (``APGDAttack_targeted.attack_single_run`` with the target set, DLR-targeted loss,
100 iterations, one restart per target as AutoAttack standard runs it per target class), each
point until its first success. All ``k`` targets are attacked (the public reference code returns
after the first).

Randomness: each (point, target rank) gets APGD's own random start, drawn from a generator seeded
by ``(seed, rank, point index)``, so a point is attacked the same in any batch or subset. A point
counts as broken only if the model misclassifies the returned example, re-checked after projecting
it exactly into the eps ball and [0, 1]. With ``state_path`` the attack saves its progress after
the ranking and after each target rank, and resumes from there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from errors import UserError

from .autoattack import _fingerprint, _keep_rng
from .context import attack_mode
from .geometry import clip_exact

MALT_NORMS = ("Linf", "L2")
DUAL_NORM = {"Linf": 1.0, "L2": 2.0}  # the norm of the gradient that converts a margin into a radius
DEFAULT_K = 3
MAX_TESTK = 100  # "all classes" means at most this many (the paper's ImageNet setting)
APGD_ITERATIONS = 100  # AutoAttack's budget for APGD-T
MIN_CLASSES = 4  # the targeted DLR loss reads the 4th-largest logit


@dataclass
class MaltResult:
    """What :func:`malt` found: examples, flags, and which target broke each point."""

    x_adv: torch.Tensor  # the example that broke a point; the input itself for the others
    robust: torch.Tensor  # bool per point
    targets: torch.Tensor  # (n, k) target classes, closest estimated boundary first (0s: misclassified at x)
    broken_at: torch.Tensor  # rank (0..k-1) of the target whose attack broke the point; -1: robust or misclassified

    def successes_per_rank(self) -> list[int]:
        """How many points each target rank broke (the later ranks are what MALT adds over one target)."""
        return [int((self.broken_at == r).sum()) for r in range(self.targets.shape[1])]


def check_malt(num_classes: int, k: int, testk: int, norm: str) -> None:
    """Refuse settings MALT cannot run with (``UserError``): the norm, too few classes, k or testk out of range."""
    if norm not in MALT_NORMS:
        raise UserError(f"MALT attacks the {' and '.join(MALT_NORMS)} threat models, not {norm}: "
                        f"drop malt for --norm {norm} (AutoAttack covers it)")
    if num_classes < MIN_CLASSES:
        raise UserError(f"MALT's targeted DLR loss needs at least {MIN_CLASSES} classes; this model has {num_classes}")
    if not 1 <= testk <= num_classes - 1:
        raise UserError(f"malt testk={testk} is out of range: this model has {num_classes} classes, so testk may be "
                        f"1..{num_classes - 1}")
    if not 1 <= k <= testk:
        raise UserError(f"malt k={k} is out of range: k may be 1..testk (testk={testk}, {num_classes} classes)")


def default_testk(num_classes: int) -> int:
    """``testk`` when not given: every other class, at most :data:`MAX_TESTK`."""
    return min(num_classes - 1, MAX_TESTK)


def boundary_estimates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor,
                       norm: str) -> torch.Tensor:
    """``(z_y - z_j) / ||grad_x (z_y - z_j)||_*`` for each candidate class ``j`` (shape of ``candidates``).

    ``inf`` where the gradient is zero (no linear estimate). One forward pass, one backward per column.
    """
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        logits = model(x)
        margins = logits.gather(1, y[:, None]) - logits.gather(1, candidates)
        estimates = torch.empty(candidates.shape, dtype=torch.float32, device=x.device)
        for col in range(candidates.shape[1]):
            (grad,) = torch.autograd.grad(margins[:, col].sum(), x, retain_graph=col < candidates.shape[1] - 1)
            dual = grad.flatten(1).norm(p=DUAL_NORM[norm], dim=1)
            radius = margins[:, col].detach() / dual.clamp_min(torch.finfo(dual.dtype).tiny)
            estimates[:, col] = torch.where(dual > 0, radius, torch.full_like(radius, float("inf"))).float()
    return estimates


@torch.no_grad()
def rank_targets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, k: int, testk: int,
                 batch_size: int = 256) -> torch.Tensor:
    """The ``k`` MALT targets per point, smallest estimated boundary radius first, as a (n, k) tensor.

    Candidates are the ``testk`` other classes of highest logit; equal estimates keep logit order.
    """
    out = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        others = model(xb).float().scatter(1, yb[:, None], float("-inf"))
        candidates = others.topk(testk, dim=1).indices
        order = boundary_estimates(model, xb, yb, candidates, norm).argsort(dim=1, stable=True)
        out.append(candidates.gather(1, order[:, :k]))
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long, device=x.device)


def apgd_starts(x: torch.Tensor, index: torch.Tensor, eps: float, norm: str, seed: int) -> torch.Tensor:
    """APGD's random start (on the sphere of radius ``eps``, then into [0, 1]), point ``i`` drawn from a
    generator seeded by ``(seed, index[i])``. Drawn on the CPU, returned on ``x.device``."""
    noise = torch.empty(x.shape, dtype=torch.float32)
    for row, i in enumerate(index.tolist()):
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % (2**63 - 1))
        if norm == "Linf":
            t = 2 * torch.rand(x.shape[1:], generator=gen) - 1
            noise[row] = t / (t.abs().max() + 1e-12)
        else:
            t = torch.randn(x.shape[1:], generator=gen)
            noise[row] = t / (t.norm() + 1e-12)
    return (x + eps * noise.to(device=x.device, dtype=x.dtype)).clamp(0.0, 1.0)


def targeted_apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, *, eps: float,
                  norm: str, start: torch.Tensor, n_iter: int = APGD_ITERATIONS) -> torch.Tensor:
    """One run of AutoAttack's targeted APGD toward ``target`` from ``start``; its best adversarial iterate
    (``start`` where none misclassified), not yet projected exactly."""
    from . import rb_bridge

    rb_bridge.install()
    from autoattack.autopgd_base import APGDAttack_targeted

    apgd = APGDAttack_targeted(model, n_iter=n_iter, norm=norm, n_restarts=1, eps=eps, seed=0, eot_iter=1,
                               rho=0.75, device=x.device, logger=logging.getLogger("auto-attack"))
    apgd.init_hyperparam(x)
    apgd.y_target = target
    _, _, _, x_best_adv = apgd.attack_single_run(x, y, x_init=start)
    return x_best_adv.detach()


def rank_seed(seed: int, rank: int) -> int:
    """The start seed of target rank ``rank`` (a fresh restart per target, as AutoAttack draws one)."""
    return (int(seed) * 7919 + 104_729 * (rank + 1)) % (2**62)


def malt(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf", k: int = DEFAULT_K,
         testk: Optional[int] = None, n_iter: int = APGD_ITERATIONS, seed: int = 0, batch_size: int = 256,
         index: Optional[torch.Tensor] = None, state_path: Optional[str | Path] = None) -> MaltResult:
    """MALT on ``(x, y)`` (images in [0, 1]); see the module docstring.

    ``index`` names each point for its random starts (default ``0..n-1``): a point with the same
    index, seed and model is attacked identically in any subset. ``state_path`` makes the run resumable.
    """
    x, y = x.detach().float().contiguous(), y.detach().to(x.device)
    index = torch.arange(len(y)) if index is None else index.detach().cpu()
    with attack_mode(model), torch.autocast(x.device.type, enabled=False), _keep_rng(x.device):
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[1]) if len(x) else MIN_CLASSES
        testk = default_testk(num_classes) if testk is None else testk
        check_malt(num_classes, k, testk, norm)
        fingerprint = _fingerprint(model, x, y, attack="malt", eps=eps, norm=norm, k=k, testk=testk, n_iter=n_iter,
                                   seed=seed, index=float(index.double().sum()))
        state = _MaltState.resume_or_start(state_path, fingerprint, model, x, y, norm, k, testk, batch_size)
        for rank in range(state.ranks_done, k if eps > 0 else 0):  # eps 0: the clean flags
            _attack_rank(model, x, y, state, rank, eps=eps, norm=norm, n_iter=n_iter, index=index,
                         seed=rank_seed(seed, rank), batch_size=batch_size)
            state.ranks_done = rank + 1
            state.save(state_path)
    return MaltResult(state.adversarial(x), state.robust.clone(), state.targets.clone(), state.broken_at.clone())


def _attack_rank(model: nn.Module, x: torch.Tensor, y: torch.Tensor, state: "_MaltState", rank: int, *, eps: float,
                 norm: str, n_iter: int, index: torch.Tensor, seed: int, batch_size: int) -> None:
    """Targeted APGD toward each still-robust point's ``rank``-th target, in batches; records the breaks."""
    todo = state.robust.nonzero().flatten()
    for start in range(0, len(todo), batch_size):
        part = todo[start:start + batch_size]
        xb, yb = x[part.to(x.device)], y[part.to(x.device)]
        target = state.targets[part, rank].to(x.device)
        begin = apgd_starts(xb, index[part], eps, norm, seed)
        found = clip_exact(targeted_apgd(model, xb, yb, target, eps=eps, norm=norm, start=begin, n_iter=n_iter),
                           xb, eps=eps, norm=norm)
        with torch.no_grad():
            fooled = (model(found).argmax(1) != yb).cpu()
        state.record(part[fooled], found[fooled.to(x.device)], rank)


@dataclass
class _MaltState:
    """Targets, flags and the examples found so far (only broken points have one); saved atomically."""

    fingerprint: dict
    targets: torch.Tensor  # (n, k) long, CPU
    robust: torch.Tensor  # bool, CPU
    broken_at: torch.Tensor  # long, CPU
    adv_index: torch.Tensor
    adv_images: torch.Tensor
    ranks_done: int = 0

    @classmethod
    def resume_or_start(cls, state_path: Optional[str | Path], fingerprint: dict, model: nn.Module, x: torch.Tensor,
                        y: torch.Tensor, norm: str, k: int, testk: int, batch_size: int) -> "_MaltState":
        if state_path is not None and Path(state_path).is_file():
            return cls.load(Path(state_path), fingerprint)
        with torch.no_grad():
            correct = torch.cat([model(b).argmax(1) == t for b, t in zip(x.split(batch_size), y.split(batch_size))]
                                ) if len(x) else torch.zeros(0, dtype=torch.bool, device=x.device)
        targets = torch.zeros(len(y), k, dtype=torch.long)
        if bool(correct.any()):
            targets[correct.cpu()] = rank_targets(model, x[correct], y[correct], norm=norm, k=k, testk=testk,
                                                  batch_size=batch_size).cpu()
        state = cls(fingerprint, targets, correct.cpu(), torch.full((len(y),), -1, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long), x.new_zeros((0, *x.shape[1:])).cpu())
        state.save(state_path)
        return state

    @classmethod
    def load(cls, path: Path, fingerprint: dict) -> "_MaltState":
        from core.torch_files import load_checkpoint

        saved = load_checkpoint(path)
        if saved.get("fingerprint") != fingerprint:
            raise UserError(f"MALT state file {path} was made for other settings, data or weights; delete it "
                            "or rerun without --resume")
        return cls(**{name: saved[name] for name in cls.__dataclass_fields__})

    def save(self, state_path: Optional[str | Path]) -> None:
        if state_path is None:
            return
        from core.torch_files import save_checkpoint

        save_checkpoint({name: getattr(self, name) for name in self.__dataclass_fields__}, state_path)

    def record(self, index: torch.Tensor, images: torch.Tensor, rank: int) -> None:
        self.robust[index] = False
        self.broken_at[index] = rank
        self.adv_index = torch.cat([self.adv_index, index])
        self.adv_images = torch.cat([self.adv_images, images.detach().cpu()])

    def adversarial(self, x: torch.Tensor) -> torch.Tensor:
        x_adv = x.clone()
        x_adv[self.adv_index.to(x.device)] = self.adv_images.to(x.device)
        return x_adv
