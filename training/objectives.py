"""What each ``--loss`` means: the attack objective and the training loss (spec sections 2 and 4).

| loss   | attack objective (start)            | training loss                                           |
|--------|-------------------------------------|---------------------------------------------------------|
| gkl    | GKL α=β=γ=1, bank weights (trades)  | CE(nat) + GKL(nat, adv; α, β, γ, bank weights, BA on)   |
| ikl    | as gkl                              | as gkl with γ = 1                                       |
| dkl    | DKL α=β=1 sample-wise (trades)      | CE(nat) + DKL(nat, adv; α, β, sample-wise, BA off)      |
| trades | KL(nat || adv) (trades)             | CE(nat) + trades_beta · KL(nat || adv)                  |
| pgd-at | CE (uniform)                        | CE(adv)                                                 |
| ce     | no attack                           | CE(nat)                                                 |

With two-view batches ``[basic; aug]`` the robust term is R(basic) + aug_weight · R(aug) and the
natural CE runs over the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import gkl_loss, kl_loss

from .distributed import mean_over_ranks

GKL_FAMILY = ("gkl", "ikl", "dkl")


@dataclass(frozen=True)
class LossSpec:
    """The loss options of a run, resolved from its config."""

    kind: str
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    break_asymmetry: bool = True
    weight_source: str = "class"
    trades_beta: float = 6.0
    label_smoothing: float = 0.0
    aug_weight: float = 0.5

    @classmethod
    def from_config(cls, cfg) -> "LossSpec":
        common = dict(label_smoothing=cfg.label_smoothing, aug_weight=cfg.aug_weight,
                      trades_beta=cfg.trades_beta, alpha=cfg.alpha, beta=cfg.beta)
        if cfg.loss == "gkl":
            return cls("gkl", gamma=cfg.gamma, break_asymmetry=True, weight_source=cfg.weight_source, **common)
        if cfg.loss == "ikl":
            return cls("ikl", gamma=1.0, break_asymmetry=True, weight_source="class", **common)
        if cfg.loss == "dkl":
            return cls("dkl", gamma=1.0, break_asymmetry=False, weight_source="sample", **common)
        return cls(cfg.loss, **common)

    @property
    def uses_attack(self) -> bool:
        return self.kind != "ce"

    @property
    def uses_bank(self) -> bool:
        return self.kind in GKL_FAMILY and self.weight_source == "class"

    @property
    def random_start(self) -> str:
        return "uniform" if self.kind == "pgd-at" else "trades"


def scores_for(spec: LossSpec, bank, y: torch.Tensor, num_classes: int) -> Optional[torch.Tensor]:
    """Per-sample weight source: bank rows of the true class, uniform rows, or None (sample-wise)."""
    if spec.kind not in GKL_FAMILY or spec.weight_source == "sample":
        return None
    if spec.weight_source == "uniform":
        return torch.full((y.shape[0], num_classes), 1.0 / num_classes, device=y.device)
    return bank.weights(y)


def attack_objective(spec: LossSpec, logits_nat: torch.Tensor, scores: Optional[torch.Tensor]
                     ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str:
    """The function PGD maximises; ``logits_nat`` are computed once, outside the attack loop."""
    if spec.kind in GKL_FAMILY:
        def objective(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return gkl_loss(logits_nat, logits_adv, alpha=1.0, beta=1.0, gamma=1.0, scores=scores,
                            break_asymmetry=spec.break_asymmetry, reduction="sum")[0]
        return objective
    if spec.kind == "trades":
        def objective(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return kl_loss(logits_nat, logits_adv, reduction="sum")
        return objective
    return "ce"


def _robust_term(spec: LossSpec, o_nat: torch.Tensor, o_adv: torch.Tensor, scores: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if spec.kind in GKL_FAMILY:
        # With gamma = 1 every weight row sums to 1 and the normaliser is the batch size on every
        # rank; otherwise each rank divides by the weight sum of the global batch.
        reduce = None if spec.gamma == 1.0 else mean_over_ranks
        return gkl_loss(o_nat, o_adv, alpha=spec.alpha, beta=spec.beta, gamma=spec.gamma, scores=scores,
                        break_asymmetry=spec.break_asymmetry, weight_sum_reduce=reduce)
    kl = kl_loss(o_nat, o_adv)
    return spec.trades_beta * kl, {"kl": kl.detach()}


def training_loss(spec: LossSpec, model: nn.Module, x_nat: torch.Tensor, x_adv: Optional[torch.Tensor],
                  y: torch.Tensor, scores: Optional[torch.Tensor], n_views: int = 1
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Loss of one step with ``model`` in train mode -> (loss, parts, logits_nat, logits_adv).

    Adversarial and natural inputs go through two separate forwards (BatchNorm statistics per
    call), adversarial first, as in the released scripts.
    """
    ls = spec.label_smoothing
    if spec.kind == "ce":
        o_nat = model(x_nat)
        ce = F.cross_entropy(o_nat, y, label_smoothing=ls)
        return ce, {"ce": ce.detach()}, o_nat, None
    o_adv = model(x_adv)
    if spec.kind == "pgd-at":
        ce = F.cross_entropy(o_adv, y, label_smoothing=ls)
        return ce, {"ce": ce.detach()}, None, o_adv
    o_nat = model(x_nat)
    ce = F.cross_entropy(o_nat, y, label_smoothing=ls)
    if n_views == 1:
        robust, parts = _robust_term(spec, o_nat, o_adv, scores)
    else:
        b = y.shape[0] // n_views
        s_basic = None if scores is None else scores[:b]
        s_aug = None if scores is None else scores[b:]
        robust, parts = _robust_term(spec, o_nat[:b], o_adv[:b], s_basic)
        r_aug, parts_aug = _robust_term(spec, o_nat[b:], o_adv[b:], s_aug)
        robust = robust + spec.aug_weight * r_aug
        parts = {k: v + spec.aug_weight * parts_aug[k] for k, v in parts.items()}
    return ce + robust, {"ce": ce.detach(), **parts}, o_nat, o_adv
