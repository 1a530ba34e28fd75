"""Training methods: one :class:`Method` entry per ``--loss``, registered in :data:`METHODS`.

An entry says everything a step needs: the training forwards (and their order, which decides
BatchNorm statistics), the loss over those logits (both views of a two-view batch), the attack
objective and its random start, whether it weighs classes (and so uses the score bank) and the
loss parts it logs, and its own hyperparameters (:class:`training.params.Param`: name, default,
range, help). ``--loss`` choices, the config keys and flags of those parameters, their range checks
and :class:`LossSpec` come from the registry; an unknown name is a ``UserError`` at config time.
Adding a method, with its parameters, is one ``register(Method(...))`` (docs/EXTENDING.md).

With two-view batches ``[basic; aug]`` the helpers below give the released form: the natural CE
over the whole batch, the robust term R(basic) + aug_weight * R(aug).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks.pgd import Objective, kl_objective
from core.distributed import mean_over_ranks
from core.registry import Registry
from errors import UserError
from losses import gkl_loss, kl_divergence, kl_loss

from .params import Param

Tensor = torch.Tensor
Parts = dict[str, Tensor]
# loss(spec, o_nat, o_adv, y, scores, n_views) -> (loss, parts); o_nat / o_adv are None when not forwarded
LossFn = Callable[["LossSpec", Optional[Tensor], Optional[Tensor], Tensor, Optional[Tensor], int], tuple[Tensor, Parts]]
# attack(spec, logits_nat, scores) -> what PGD maximises ("ce" or a closure over the natural logits)
AttackFn = Callable[["LossSpec", Optional[Tensor], Optional[Tensor]], Union[Objective, str]]
FORWARDS = ("adv", "nat")


@dataclass(frozen=True)
class Method:
    """One training method; see the module docstring."""

    name: str
    summary: str  # one line: attack objective and training loss, for --help and the README
    forwards: tuple[str, ...]  # training forwards in order, from FORWARDS
    loss: LossFn
    parts: tuple[str, ...]  # loss parts it logs (besides the total "loss")
    attack: Optional[AttackFn] = None  # None: no attack (standard training)
    attack_uses_nat: bool = False  # compute the natural logits once before the attack
    random_start: str = "trades"  # pgd random_start of the training attack
    weighted: bool = False  # takes per-sample class weights (``weight_source``: bank, uniform or sample-wise)
    params: tuple[Param, ...] = ()  # its own hyperparameters: config keys ``<prefix>_<name>``
    prefix: str = ""  # of those keys (default: the name); methods sharing one share the parameters
    fixed: Mapping[str, Any] = field(default_factory=dict)  # parameters / LossSpec fields this method pins
    check: Optional[Callable[[Mapping[str, Any]], None]] = None  # cross-parameter check (UserError) of spec.params

    def __post_init__(self) -> None:
        if not self.forwards or set(self.forwards) - set(FORWARDS) or len(set(self.forwards)) != len(self.forwards):
            raise ValueError(f"method {self.name}: forwards must be distinct names from {FORWARDS}")
        if self.attack is None and "adv" in self.forwards:
            raise ValueError(f"method {self.name}: an adversarial forward needs an attack")
        if len({p.name for p in self.params}) != len(self.params):
            raise ValueError(f"method {self.name}: a parameter name is declared twice")

    def key(self, param: str) -> str:
        """The config key of parameter ``param`` (``gkl_ce_weight``); its flag is ``--gkl-ce-weight``."""
        return f"{(self.prefix or self.name).replace('-', '_')}_{param}"

    def metric_names(self) -> tuple[str, ...]:
        """What a step logs: the loss, its parts, then the accuracy of each forward."""
        return ("loss", *self.parts) + tuple(f"acc_{which}" for which in ("nat", "adv") if which in self.forwards)


METHODS: Registry[Method] = Registry("training method")


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (a name may be registered once; methods that share a
    parameter key must declare that parameter alike)."""
    declared = declared_parameters()
    for p in method.params:
        if declared.get(method.key(p.name), p) != p:
            raise ValueError(f"method {method.name}: {method.key(p.name)} is declared otherwise by another method")
    return METHODS.add(method.name, method)


def declared_parameters() -> dict[str, Param]:
    """Config key -> parameter, of every registered method (in registration order; shared keys once)."""
    out: dict[str, Param] = {}
    for method in METHODS.values():
        for p in method.params:
            out.setdefault(method.key(p.name), p)
    return out


def key_for_old_name(old: str, loss: str) -> Optional[str]:
    """The config key an old key (``beta``) reads as: the parameter of method ``loss`` that claims
    it, else the first registered one that does (None: no parameter claims it)."""
    claims = [(m, p) for m in METHODS.values() for p in m.params if old in p.old_keys]
    if not claims:
        return None
    method, param = next(((m, p) for m, p in claims if m.name == loss), claims[0])
    return method.key(param.name)


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a ``UserError`` listing the choices."""
    return METHODS.choose(name, "--loss")


@dataclass(frozen=True)
class LossSpec:
    """The loss options of a run, resolved from its config: ``kind`` is the method's name, ``params``
    its declared parameters by short name (its ``fixed`` values applied)."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    weight_source: str = "class"
    label_smoothing: float = 0.0
    aug_weight: float = 0.5
    # This process's share of the step's global batch times the world size: 1 when the batch splits
    # evenly over the processes (always in one process); set per step for an uneven last batch.
    rank_share: float = 1.0

    @classmethod
    def of(cls, kind: str, **values: Any) -> "LossSpec":
        """Method ``kind``'s spec: its parameters' defaults, then ``values`` (parameters by short name,
        or fields of this class), then what the method pins."""
        method = get_method(kind)
        general = {f.name for f in fields(cls)} - {"kind", "params"}
        settings = {**{p.name: p.default for p in method.params}, **values, **method.fixed}
        unknown = sorted(set(settings) - general - {p.name for p in method.params})
        if unknown:
            raise ValueError(f"method {kind} has no parameter {', '.join(unknown)}; it declares: "
                             f"{', '.join(p.name for p in method.params) or 'none'}")
        return cls(kind, params={k: v for k, v in settings.items() if k not in general},
                   **{k: v for k, v in settings.items() if k in general})

    @classmethod
    def from_config(cls, cfg) -> "LossSpec":
        method = get_method(cfg.loss)
        return cls.of(cfg.loss, weight_source=cfg.weight_source, label_smoothing=cfg.label_smoothing,
                      aug_weight=cfg.aug_weight, **{p.name: getattr(cfg, method.key(p.name)) for p in method.params})

    @property
    def method(self) -> Method:
        return get_method(self.kind)

    @property
    def uses_attack(self) -> bool:
        return self.method.attack is not None

    @property
    def uses_bank(self) -> bool:
        return self.method.weighted and self.weight_source == "class"

    @property
    def random_start(self) -> str:
        return self.method.random_start


def scores_for(spec: LossSpec, bank, y: Tensor, num_classes: int) -> Optional[Tensor]:
    """Per-sample weight source: bank rows of the true class, uniform rows, or None (sample-wise)."""
    if not spec.method.weighted or spec.weight_source == "sample":
        return None
    if spec.weight_source == "uniform":
        return torch.full((y.shape[0], num_classes), 1.0 / num_classes, device=y.device)
    return bank.weights(y)


def training_loss(spec: LossSpec, model: nn.Module, x_nat: Tensor, x_adv: Optional[Tensor], y: Tensor,
                  scores: Optional[Tensor], n_views: int = 1
                  ) -> tuple[Tensor, Parts, Optional[Tensor], Optional[Tensor]]:
    """Loss of one step with ``model`` in train mode -> (loss, parts, logits_nat, logits_adv).

    Each forward of the method is its own call (BatchNorm statistics per call), in its order.
    """
    method = spec.method
    logits: dict[str, Tensor] = {}
    for which in method.forwards:
        logits[which] = model(x_adv if which == "adv" else x_nat)
    o_nat, o_adv = logits.get("nat"), logits.get("adv")
    loss, parts = method.loss(spec, o_nat, o_adv, y, scores, n_views)
    return loss, parts, o_nat, o_adv


# ------------------------------------------------------------------------------------- helpers
# term(spec, o_nat, o_adv, y, scores) -> (value, parts) on one view
RobustFn = Callable[[LossSpec, Tensor, Tensor, Tensor, Optional[Tensor]], tuple[Tensor, Parts]]


def over_views(term: RobustFn, spec: LossSpec, o_nat: Tensor, o_adv: Tensor, y: Tensor, scores: Optional[Tensor],
               n_views: int) -> tuple[Tensor, Parts]:
    """``term`` on a one-view batch, or term(basic) + aug_weight * term(aug) on ``[basic; aug]``."""
    if n_views == 1:
        return term(spec, o_nat, o_adv, y, scores)
    b = o_nat.shape[0] // n_views
    value, parts = term(spec, o_nat[:b], o_adv[:b], y[:b], None if scores is None else scores[:b])
    value_aug, parts_aug = term(spec, o_nat[b:], o_adv[b:], y[b:], None if scores is None else scores[b:])
    return value + spec.aug_weight * value_aug, {k: v + spec.aug_weight * parts_aug[k] for k, v in parts.items()}


def natural_ce_plus(term: RobustFn) -> LossFn:
    """The TRADES-style loss CE(nat) + robust term, the CE over the whole batch."""
    def loss(spec: LossSpec, o_nat, o_adv, y, scores, n_views):
        ce = F.cross_entropy(o_nat, y, label_smoothing=spec.label_smoothing)
        robust, parts = over_views(term, spec, o_nat, o_adv, y, scores, n_views)
        return ce + robust, {"ce": ce.detach(), **parts}
    return loss


def per_view(term: RobustFn) -> LossFn:
    """A loss that is ``term`` alone (no separate natural CE), per view of a two-view batch."""
    def loss(spec: LossSpec, o_nat, o_adv, y, scores, n_views):
        return over_views(term, spec, o_nat, o_adv, y, scores, n_views)
    return loss


def ce_on(which: str) -> LossFn:
    """Plain cross-entropy on the natural or the adversarial logits (the whole batch)."""
    def loss(spec: LossSpec, o_nat, o_adv, y, scores, n_views):
        ce = F.cross_entropy(o_nat if which == "nat" else o_adv, y, label_smoothing=spec.label_smoothing)
        return ce, {"ce": ce.detach()}
    return loss


# ------------------------------------------------------------------------------------- GKL family
def gkl_term(spec: LossSpec, o_nat: Tensor, o_adv: Tensor, y: Tensor, scores: Optional[Tensor]
             ) -> tuple[Tensor, Parts]:
    """GKL(nat, adv) with the run's weights, exponent and class weights (spec sections 2 and 4)."""
    p = spec.params
    # With gamma = 1 every weight row sums to 1 and the normaliser is the batch size on every
    # rank; otherwise each rank divides by the weight sum of the global batch. On an uneven last
    # batch each rank's loss is scaled by its share before DDP averages the gradients, so the
    # normaliser carries the inverse factor: the scaled ranks then sum to the global wMSE.
    reduce = None
    if p["weight_exponent"] != 1.0:
        share = spec.rank_share
        reduce = mean_over_ranks if share == 1.0 else (lambda total: mean_over_ranks(total) * share)
    return gkl_loss(o_nat, o_adv, alpha=p["wmse_weight"], beta=p["ce_weight"], gamma=p["weight_exponent"],
                    scores=scores, break_asymmetry=p["break_asymmetry"], weight_sum_reduce=reduce)


def gkl_attack(spec: LossSpec, logits_nat: Tensor, scores: Optional[Tensor]) -> Objective:
    """GKL with gamma = 1, the step's class weights and the attack's weights (``attack_wmse_weight``,
    ``attack_ce_weight``: 1 and 1 in the released CIFAR-100 script, 0 and 1 in the CIFAR-10 one);
    ``logits_nat`` is constant."""
    p = spec.params
    alpha, beta, break_asymmetry = p["attack_wmse_weight"], p["attack_ce_weight"], p["break_asymmetry"]

    def objective(logits_adv: Tensor, y: Tensor) -> Tensor:
        return gkl_loss(logits_nat, logits_adv, alpha=alpha, beta=beta, gamma=1.0, scores=scores,
                        break_asymmetry=break_asymmetry, reduction="sum")[0]
    return objective


def _check_gkl_attack(params: Mapping[str, Any]) -> None:
    if params["attack_wmse_weight"] == 0 and params["attack_ce_weight"] == 0:
        raise UserError("--gkl-attack-wmse-weight and --gkl-attack-ce-weight (were --attack-alpha, --attack-beta) "
                        "are both 0: the GKL attack would maximise nothing; set one of them > 0 (the released "
                        "CIFAR-10 script: --gkl-attack-wmse-weight 0 --gkl-attack-ce-weight 1)")


# The paper's names: GKL = alpha/4 * wMSE + beta * soft-label CE with class weights ** gamma (the
# released scripts swap alpha and beta: their --beta weighs the wMSE).
GKL_PARAMS = (
    Param("wmse_weight", 20.0, "weight of the wMSE term, the paper's alpha (the loss adds alpha/4 * wMSE; "
          "the released scripts' --beta)", low=0, old_keys=("alpha",)),
    Param("ce_weight", 5.0, "weight of the soft-label CE term, the paper's beta (the released scripts' --alpha)",
          low=0, old_keys=("beta",)),
    Param("weight_exponent", 1.0, "exponent of the class weights, the paper's gamma (< 1 smooths them)",
          low=0, high=1, old_keys=("gamma",)),
    Param("break_asymmetry", True, "BA of the paper: the wMSE gradient also reaches the adversarial logits "
          "(false: DKL's stop-gradient)"),
    Param("attack_wmse_weight", 1.0, "wMSE weight of the training attack's GKL objective (its alpha)", low=0,
          old_keys=("attack_alpha",)),
    Param("attack_ce_weight", 1.0, "soft-label CE weight of the training attack's GKL objective (its beta)",
          low=0, old_keys=("attack_beta",)),
)


def _gkl_family(name: str, summary: str, **fixed: Any) -> Method:
    return Method(name, summary, forwards=("adv", "nat"), loss=natural_ce_plus(gkl_term),
                  parts=("ce", "soft_ce", "wmse"), attack=gkl_attack, attack_uses_nat=True, weighted=True,
                  params=GKL_PARAMS, prefix="gkl", fixed=fixed, check=_check_gkl_attack)


register(_gkl_family("gkl", "attack: GKL (gkl_attack_* weights, gamma = 1, bank weights); loss: CE(nat) + "
                     "GKL(nat, adv; gkl_* weights, exponent, bank weights, BA on)"))
register(_gkl_family("ikl", "as gkl with gamma = 1 and class-wise (bank) weights",
                     weight_exponent=1.0, break_asymmetry=True, weight_source="class"))
register(_gkl_family("dkl", "attack and loss DKL: sample-wise weights, no BA, gamma = 1",
                     weight_exponent=1.0, break_asymmetry=False, weight_source="sample"))


# ------------------------------------------------------------------------------------- baselines
def trades_term(spec: LossSpec, o_nat: Tensor, o_adv: Tensor, y: Tensor, scores: Optional[Tensor]
                ) -> tuple[Tensor, Parts]:
    kl = kl_loss(o_nat, o_adv)
    return spec.params["kl_weight"] * kl, {"kl": kl.detach()}


def trades_attack(spec: LossSpec, logits_nat: Tensor, scores: Optional[Tensor]) -> Objective:
    """KL(nat || adv) per sample (PGD sums it over the batch); ``logits_nat`` is constant."""
    return kl_objective(logits_nat)


def ce_attack(spec: LossSpec, logits_nat: Optional[Tensor], scores: Optional[Tensor]) -> str:
    return "ce"


register(Method("trades", "attack: KL(nat || adv); loss: CE(nat) + trades_kl_weight * KL(nat || adv)",
                forwards=("adv", "nat"), loss=natural_ce_plus(trades_term), parts=("ce", "kl"),
                attack=trades_attack, attack_uses_nat=True,
                params=(Param("kl_weight", 6.0, "weight of the KL term, the TRADES paper's beta (1/lambda)", low=0,
                              old_keys=("trades_beta",)),)))
register(Method("pgd-at", "attack: CE from a uniform start in the ball; loss: CE(adv) (Madry et al.)",
                forwards=("adv",), loss=ce_on("adv"), parts=("ce",), attack=ce_attack, random_start="uniform"))
register(Method("ce", "no attack; loss: CE(nat) (standard training)", forwards=("nat",), loss=ce_on("nat"),
                parts=("ce",)))


# ------------------------------------------------------------------------------------- MART
def mart_term(spec: LossSpec, o_nat: Tensor, o_adv: Tensor, y: Tensor, scores: Optional[Tensor]
              ) -> tuple[Tensor, Parts]:
    """MART (Wang et al., ICLR 2020): BCE(adv) + beta * mean_i (1 - p_y(nat_i)) * KL(p(nat_i) || p(adv_i)).

    BCE = -log p_y(adv) - log(1 - max_{k != y} p_k(adv)); the second log is computed as a
    difference of log-sum-exps (exact, no 1e-12 guards). Gradient flows through every term,
    the misclassification weight included, as in the paper's objective and the released code.
    """
    is_label = F.one_hot(y, o_adv.shape[1]).bool()
    top_wrong = o_adv.masked_fill(is_label, float("-inf")).argmax(1, keepdim=True)
    without_top = o_adv.scatter(1, top_wrong, float("-inf"))
    margin = torch.logsumexp(o_adv, 1) - torch.logsumexp(without_top, 1)  # -log(1 - p_top_wrong(adv))
    bce = F.cross_entropy(o_adv, y, label_smoothing=spec.label_smoothing) + margin.mean()
    log_p_nat, log_p_adv = F.log_softmax(o_nat, 1), F.log_softmax(o_adv, 1)
    kl = kl_divergence(log_p_nat, log_p_adv)
    weighted_kl = (kl * (1 - log_p_nat.gather(1, y[:, None]).squeeze(1).exp())).mean()
    return bce + spec.params["kl_weight"] * weighted_kl, {"bce": bce.detach(), "kl": weighted_kl.detach()}


register(Method("mart", "attack: CE from x + 0.001 N(0, 1); loss: BCE(adv) + mart_kl_weight * (1 - p_y(nat)) * "
                "KL(nat || adv) (Wang et al. 2020)",
                forwards=("nat", "adv"), loss=per_view(mart_term), parts=("bce", "kl"), attack=ce_attack,
                params=(Param("kl_weight", 6.0, "weight of the misclassification-weighted KL term, the MART "
                              "paper's beta", low=0, old_keys=("beta",)),)))


# ------------------------------------------------------------------------------------- ALP
def alp_term(spec: LossSpec, o_nat: Tensor, o_adv: Tensor, y: Tensor, scores: Optional[Tensor]
             ) -> tuple[Tensor, Parts]:
    """Adversarial logit pairing (Kannan et al. 2018): the mixed-batch CE (CE(nat) + CE(adv)) / 2 plus
    ``pair_weight`` times the batch mean of the squared L2 distance between natural and adversarial logits."""
    ce = (F.cross_entropy(o_nat, y, label_smoothing=spec.label_smoothing)
          + F.cross_entropy(o_adv, y, label_smoothing=spec.label_smoothing)) / 2
    pair = (o_nat - o_adv).square().sum(1).mean()
    return ce + spec.params["pair_weight"] * pair, {"ce": ce.detach(), "pair": pair.detach()}


register(Method("alp", "attack: CE from a uniform start in the ball; loss: (CE(nat) + CE(adv)) / 2 + "
                "alp_pair_weight * ||logits(nat) - logits(adv)||^2 (Kannan et al. 2018)",
                forwards=("adv", "nat"), loss=per_view(alp_term), parts=("ce", "pair"), attack=ce_attack,
                random_start="uniform",
                params=(Param("pair_weight", 0.5, "weight of the logit pairing term (squared L2 distance of "
                              "natural and adversarial logits), ALP's lambda", low=0),)))
