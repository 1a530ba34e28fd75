"""KL, DKL and GKL losses on logits (spec sections 2 and 8), one implementation with options.

Conventions used throughout:

- ``m`` is the reference side (natural logits in AT, teacher in KD), ``n`` the side being pulled
  towards it (adversarial logits in AT, student in KD). Both are ``(B, C)`` logits.
- ``GKL = alpha/4 * wMSE + beta * soft_CE`` with
  ``wMSE = sum_{j,k} v_j v_k (dm_jk - dn_jk)^2 / norm`` where ``dm_jk = o_m[j] - o_m[k]`` and
  ``soft_CE = -sum_j S(softmax(o_m/T))[j] * log_softmax(o_n/T)[j]`` (times ``T^2``, see below).
- The weight vector ``v`` is ``S(softmax(o_m/T)) ** gamma`` (sample-wise) or ``scores ** gamma``
  when ``scores`` is given (class-wise: the score-bank row of each sample's true class). It never
  receives gradient.
- wMSE is computed in O(B*C) from ``d = o_m - o_n``:
  ``sum_{j,k} v_j v_k (d_j - d_k)^2 = 2 (sum v)(sum v d^2) - 2 (sum v d)^2``. The identity is
  applied to ``d`` shifted by its weighted mean, which leaves every ``d_j - d_k`` unchanged but
  keeps the two terms from cancelling catastrophically when ``d`` has a large common offset.

Temperature: the loss at temperature ``T`` is ``T^2`` times DKL/GKL on the logits ``o / T`` (the
classic KD scaling, so that gradient magnitudes do not shrink as ``1/T^2``). For the wMSE term the
``T^2`` and the ``1/T^2`` cancel, so wMSE is always on the raw logits while the sample-wise weights
use ``softmax(o_m / T)``; the soft CE term is ``T^2 * CE(softmax(o_m/T), log_softmax(o_n/T))``.
With this convention DKL (BA off, sample-wise weights, alpha = beta = gamma = 1) at temperature
``T`` has exactly the gradients of ``T^2 * KL(softmax(o_m/T) || softmax(o_n/T))``. The authors'
released KD script omits the ``T^2`` on the CE term: pass ``beta / T**2`` to reproduce it. It also
allows a separate temperature for the sample-wise weights: pass ``scores=softmax(teacher / T2)``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from errors import UserError

NORMALIZATIONS = ("weight_sum", "batch")
REDUCTIONS = ("mean", "sum", "none")
KL_REDUCTIONS = ("batchmean", "sum", "none")


def _working_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; half, bfloat16 and float32 are computed in float32."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_logits(logits_m: Tensor, logits_n: Tensor, scores: Tensor | None = None) -> None:
    if logits_m.ndim != 2 or logits_m.shape != logits_n.shape:
        raise ValueError(
            f"logits must both be (B, C); got {tuple(logits_m.shape)} and {tuple(logits_n.shape)}"
        )
    if scores is not None and scores.shape != logits_m.shape:
        raise ValueError(f"scores must be (B, C) = {tuple(logits_m.shape)}; got {tuple(scores.shape)}")


def _check_options(gamma: float, normalize: str, temperature: float, reduction: str) -> None:
    if normalize not in NORMALIZATIONS:
        raise UserError(f"normalize={normalize!r} is not supported; use one of {NORMALIZATIONS}")
    if reduction not in REDUCTIONS:
        raise UserError(f"reduction={reduction!r} is not supported; use one of {REDUCTIONS}")
    if not temperature > 0:
        raise UserError(f"temperature={temperature} must be > 0; use e.g. 1.0")
    if not gamma >= 0:
        raise UserError(f"gamma={gamma} must be >= 0 (the paper uses values in [0, 1])")


def wmse_terms(d: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``sum_{j,k} v_j v_k (d_j - d_k)^2`` and ``sum_{j,k} v_j v_k``, in O(B*C).

    ``v`` must not require gradient. The weighted mean used for the shift is detached: the
    identity holds for any shift, so its gradient with respect to ``d`` is exact without it.
    """
    v_sum = v.sum(-1)
    shift = (v * d).sum(-1) / v_sum.clamp_min(torch.finfo(d.dtype).tiny)
    e = d - shift.detach().unsqueeze(-1)
    numerator = 2 * v_sum * (v * e.square()).sum(-1) - 2 * (v * e).sum(-1).square()
    return numerator, v_sum.square()


def _weights(logits_m: Tensor, scores: Tensor | None, gamma: float, temperature: float,
             dtype: torch.dtype) -> Tensor:
    if scores is None:
        base = torch.softmax(logits_m.detach().to(dtype) / temperature, dim=-1)
    else:
        base = scores.detach().to(device=logits_m.device, dtype=dtype)
    return base.pow(gamma)


def _soft_ce(o_m: Tensor, o_n: Tensor, temperature: float) -> Tensor:
    """Per-sample ``T^2 * -sum S(softmax(o_m/T)) * log_softmax(o_n/T)``; gradient only into o_n."""
    if temperature != 1.0:
        o_m, o_n = o_m / temperature, o_n / temperature
    ce = -(torch.softmax(o_m.detach(), dim=-1) * F.log_softmax(o_n, dim=-1)).sum(-1)
    return ce if temperature == 1.0 else ce * temperature**2


def _reduce_wmse(numerator: Tensor, weight_sum: Tensor, normalize: str, reduction: str,
                 weight_sum_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    tiny = torch.finfo(numerator.dtype).tiny
    if normalize == "batch":
        per_sample = numerator
    else:
        per_sample = numerator / weight_sum.clamp_min(tiny)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if normalize == "batch":
        return per_sample.mean()
    # The released GKL code: batch sum of w*(dm-dn)^2 over the batch sum of w.
    total = weight_sum.sum()
    if weight_sum_reduce is not None:
        total = weight_sum_reduce(total)
    return numerator.sum() / total.clamp_min(tiny)


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return values
    return values.sum() if reduction == "sum" else values.mean()


def gkl_loss(
    logits_m: Tensor,
    logits_n: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    scores: Tensor | None = None,
    break_asymmetry: bool = True,
    normalize: str = "weight_sum",
    temperature: float = 1.0,
    reduction: str = "mean",
    weight_sum_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GKL (and DKL/IKL as special cases) between logits ``o_m`` and ``o_n``, both ``(B, C)``.

    Returns ``(loss, parts)`` with ``loss = alpha/4 * parts["wmse"] + beta * parts["soft_ce"]``;
    ``parts`` are detached and reduced like ``loss``. Computed in float32 at least.

    - ``scores=None``: sample-wise weights ``softmax(o_m/T) ** gamma``; otherwise ``scores ** gamma``
      with ``scores`` a ``(B, C)`` tensor (score-bank rows of the true classes, or uniform 1/C).
    - ``break_asymmetry=False`` stops the gradient of ``o_n`` inside wMSE (DKL); with sample-wise
      weights and ``alpha = beta = gamma = 1`` the gradients equal those of KL.
    - ``normalize="weight_sum"``: wMSE divided by the weight sum ``(sum v)^2`` (released code; for
      ``reduction="mean"`` the batch sums are divided, for ``"none"``/``"sum"`` each sample by its
      own); ``"batch"``: per-sample sums, averaged over the batch for ``"mean"``.
    - ``reduction``: ``"mean"``, ``"sum"`` (sum of the ``"none"`` values) or ``"none"`` (``(B,)``).
    - ``temperature``: see the module docstring (``T^2`` scaling, wMSE on raw logits).
    - ``weight_sum_reduce``: applied to the batch weight sum (``"weight_sum"`` and ``"mean"`` only),
      e.g. its mean over data-parallel processes, so that each divides by the global normaliser.
    """
    _check_logits(logits_m, logits_n, scores)
    _check_options(gamma, normalize, temperature, reduction)
    dtype = _working_dtype(logits_m)
    o_m, o_n = logits_m.to(dtype), logits_n.to(dtype)
    v = _weights(o_m, scores, gamma, temperature, dtype)
    d = o_m - (o_n if break_asymmetry else o_n.detach())
    numerator, weight_sum = wmse_terms(d, v)
    wmse = _reduce_wmse(numerator, weight_sum, normalize, reduction, weight_sum_reduce)
    soft_ce = _reduce(_soft_ce(o_m, o_n, temperature), reduction)
    loss = alpha / 4 * wmse + beta * soft_ce
    return loss, {"wmse": wmse.detach(), "soft_ce": soft_ce.detach()}


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q) = sum_j p_j (log p_j - log q_j)`` per sample, from log-probabilities ``(B, C)`` -> ``(B,)``.

    The one KL of the project: :func:`kl_loss`, the TRADES attack objective and MART's term all
    compute it here (MART passes the natural log-probabilities it also uses for its weight).
    """
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def kl_loss(logits_m: Tensor, logits_n: Tensor, reduction: str = "batchmean") -> Tensor:
    """``KL(softmax(o_m) || softmax(o_n))`` per sample, as TRADES uses it.

    Gradient flows into both logits unless the caller detaches one. ``reduction``: ``"batchmean"``
    (mean over samples of the per-sample sum), ``"sum"`` or ``"none"`` (``(B,)``).
    """
    _check_logits(logits_m, logits_n)
    if reduction not in KL_REDUCTIONS:
        raise UserError(f"reduction={reduction!r} is not supported; use one of {KL_REDUCTIONS}")
    dtype = _working_dtype(logits_m)
    per_sample = kl_divergence(F.log_softmax(logits_m.to(dtype), dim=-1), F.log_softmax(logits_n.to(dtype), dim=-1))
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def gkl_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    temperature: float,
    scores: Tensor | None = None,
    break_asymmetry: bool = True,
    normalize: str = "weight_sum",
    reduction: str = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """GKL-KD: :func:`gkl_loss` with ``m`` = the detached teacher and ``n`` = the student.

    With ``break_asymmetry=True`` the wMSE term trains the student; with it off, wMSE sends no
    gradient anywhere (the DKL-KD case of the paper's Eq. 10).
    """
    return gkl_loss(
        teacher_logits.detach(), student_logits, alpha=alpha, beta=beta, gamma=gamma,
        scores=scores, break_asymmetry=break_asymmetry, normalize=normalize,
        temperature=temperature, reduction=reduction,
    )


class GKLLoss(nn.Module):
    """Module form of :func:`gkl_loss` holding its options; ``forward(o_m, o_n, scores=None)``."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        *,
        break_asymmetry: bool = True,
        normalize: str = "weight_sum",
        temperature: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check_options(gamma, normalize, temperature, reduction)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.break_asymmetry = bool(break_asymmetry)
        self.normalize, self.temperature, self.reduction = normalize, float(temperature), reduction

    def forward(self, logits_m: Tensor, logits_n: Tensor,
                scores: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(loss, {"wmse", "soft_ce"})`` for natural/teacher ``logits_m``."""
        return gkl_loss(
            logits_m, logits_n, alpha=self.alpha, beta=self.beta, gamma=self.gamma, scores=scores,
            break_asymmetry=self.break_asymmetry, normalize=self.normalize,
            temperature=self.temperature, reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
                f"break_asymmetry={self.break_asymmetry}, normalize={self.normalize!r}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}")
