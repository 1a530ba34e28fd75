"""One typed config: a dataclass filled from a YAML preset plus command-line overrides.

``--preset NAME`` reads ``configs/NAME.yaml``; every key is also a flag (``--epochs 5``,
``--gkl-ce-weight 4``, ``--eps 8/255``). The training methods' own parameters (``gkl_*``,
``trades_*``, ...) are declared in their registry entries (:mod:`training.methods`): their keys,
flags, help and range checks come from there. Keys of earlier versions (``alpha``, ``beta``,
``gamma``, ``trades_beta``, ``attack_alpha``, ``attack_beta``) keep loading, from files and as
flags, with a one-line note. The resolved config is saved as ``config.yaml`` in the run folder, so
a run can be reproduced (and evaluated) from its folder alone.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml

from core.files import atomic_write_text
from core.threat import NORMS, eps_text, parse_eps  # noqa: F401  (parse_eps: part of this module's API)
from core.tracking import TRACKERS
from errors import UserError

from .methods import METHODS, declared_parameters, get_method, key_for_old_name
from .params import Param
from .presets import CONFIG_DIR, list_presets, load_preset, load_yaml  # noqa: F401  (this module's API too)

EPS_SCHEDULES = ("linear", "constant")
ATTACK_BUDGETS = ("effective", "staged", "low", "fixed")
LR_SCHEDULES = ("cosine-epoch", "cosine-step", "cosine-trades", "onecycle", "step", "constant")
AVERAGING = ("epoch-ema", "step-ema", "none")
WEIGHT_SOURCES = ("class", "sample", "uniform")
AMP_MODES = ("auto", "bf16", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AWP_PROXY_VIEWS = ("split", "joint")
GENERATED_EPOCHS = ("real-pass", "dataset-size")


@dataclass(init=False)
class TrainConfig:
    """Every setting of a training run (defaults: the paper's CIFAR-100 GKL-AT row).

    Besides the fields below, every parameter a registered method declares is a key (``gkl_ce_weight``):
    held in ``method_params``, read as an attribute (``cfg.gkl_ce_weight``), given to the constructor
    as a keyword like any field.
    """

    # data
    dataset: str = "cifar100"
    data_dir: str = "./datasets"
    download: bool = False
    augment: str = "basic"  # none | crop | basic | autoaug (two-view)
    aug_weight: float = 0.5  # weight of the AutoAugment view's robust loss
    generated: Optional[str] = None  # folder of generated-data shards (DM-AT)
    generated_fraction: float = 0.7
    generated_epoch: str = "real-pass"  # real-pass: one pass over the real images | dataset-size: DM-AT's epoch
    val_size: int = 0  # training images held out for per-epoch metrics and `best` (0: none, train on all)
    drop_last: bool = False  # drop each epoch's last partial batch (the released TRADES script does)
    # model
    arch: str = "wrn-34-10"  # a registry name, or MODULE:CALLABLE (models.factory)
    arch_kwargs: str = ""  # JSON object of the architecture's keyword arguments, e.g. '{"width": 64}'
    sync_bn: bool = False
    ghost_bn: int = 0  # images per BatchNorm call in a full batch of one process (DataParallel's per-GPU batch); 0: off
    # loss
    loss: str = "gkl"
    method_params: dict[str, Any] = field(default_factory=dict)  # config key -> value, every registered method's
    tau: float = 4.0  # temperature of the class-wise score bank (weighted methods)
    weight_source: str = "class"  # class (bank) | sample | uniform: the class weights of weighted methods
    label_smoothing: float = 0.0
    # attack used for training
    norm: str = "Linf"
    eps: float = 8 / 255
    eps_schedule: str = "linear"
    attack_budget: str = "effective"
    attack_steps: int = 10  # used when attack_budget = fixed
    attack_step_size: float = 2 / 255  # used when attack_budget = fixed
    # AWP
    awp_gamma: float = 0.005  # 0 disables AWP
    awp_warmup: int = 10  # first epoch with AWP
    awp_proxy_views: str = "split"  # two-view proxy loss: split (as the training loss) | joint (one term, released)
    # optimisation
    epochs: int = 200
    batch_size: int = 128  # global batch
    lr: float = 0.2
    lr_schedule: str = "cosine-epoch"
    lr_milestones: tuple[int, ...] = ()  # lr_schedule step: epochs from which the lr is multiplied by lr_decay
    lr_decay: float = 0.1
    warmup_epochs: int = 0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    # weight averaging
    averaging: str = "epoch-ema"
    avg_decay: float = 0.9  # epoch-ema: avg = decay*avg + (1-decay)*w at each epoch end
    avg_start_epoch: int = 1
    step_ema_decay: float = 0.995
    step_ema_warmup: int = 0  # steps before the per-step EMA starts to average
    # run
    seed: int = 0
    workers: int = -1  # data-loading processes per rank; -1: auto (0 on CPU, min(8, cpus - 1) on CUDA)
    eval_subset: int = 500  # held-out images used for per-epoch natural / PGD accuracy
    eval_pgd_steps: int = 10
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    keep_checkpoints: int = 2  # rolling epoch checkpoints kept besides last and best
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast on CUDA when auto
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead replays CUDA graphs
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: trace without code generation)
    deterministic: bool = False
    tracker: str = "tensorboard"  # live scalars of every log.csv column: tensorboard (RUN/tb) | wandb | mlflow | none
    preset: Optional[str] = None

    def __init__(self, **values: Any) -> None:
        """Keyword per config key: the fields and the declared method parameters (defaults for the rest)."""
        declared = _declared()
        params = dict(values.pop("method_params", None) or {})
        params.update({k: values.pop(k) for k in list(values) if k in declared})
        unknown = sorted(set(params) - set(declared)) + sorted(set(values) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"TrainConfig has no key(s) {', '.join(unknown)}")
        for f in fields(self):
            if f.name != "method_params":
                default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
                object.__setattr__(self, f.name, values.get(f.name, default))
        object.__setattr__(self, "method_params", {k: params.get(k, p.default) for k, p in declared.items()})

    def __getattr__(self, name: str) -> Any:  # only called for names that are not fields
        params = self.__dict__.get("method_params")
        if params is not None and name in params:
            return params[name]
        renamed = key_for_old_name(name, self.__dict__.get("loss", "gkl"))
        raise AttributeError(f"{type(self).__name__} has no key {name!r}"
                             + (f" (renamed {renamed})" if renamed else ""))

    def __setattr__(self, name: str, value: Any) -> None:
        params = self.__dict__.get("method_params")
        if params is not None and name in params:
            params[name] = value
        else:
            object.__setattr__(self, name, value)

    def validate(self) -> "TrainConfig":
        from data import AUGMENTATIONS, DATASETS, canonical_name
        from models import ARCHS, check_arch

        choices = {"dataset": DATASETS, "augment": AUGMENTATIONS, "arch": ARCHS, "loss": tuple(METHODS),
                   "eps_schedule": EPS_SCHEDULES, "attack_budget": ATTACK_BUDGETS,
                   "lr_schedule": LR_SCHEDULES, "averaging": AVERAGING, "weight_source": WEIGHT_SOURCES,
                   "amp": AMP_MODES, "norm": NORMS, "compile_mode": COMPILE_MODES,
                   "awp_proxy_views": AWP_PROXY_VIEWS, "generated_epoch": GENERATED_EPOCHS, "tracker": TRACKERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not one of: "
                                f"{', '.join(allowed)}")
        self.arch, self.arch_kwargs = check_arch(self.arch, self.arch_kwargs)
        self.dataset = canonical_name(self.dataset)
        self._validate_ranges()
        if self.warmup_epochs >= self.epochs:
            raise UserError(f"--warmup-epochs {self.warmup_epochs} must be smaller than --epochs {self.epochs}")
        if self.lr_schedule == "step" and not self.lr_milestones:
            raise UserError("--lr-schedule step needs --lr-milestones, e.g. --lr-milestones 75,90")
        if any(m < 1 for m in self.lr_milestones):
            raise UserError(f"--lr-milestones must be epochs >= 1, got {','.join(map(str, self.lr_milestones))}")
        method = get_method(self.loss)
        if method.check is not None:
            method.check({p.name: getattr(self, method.key(p.name)) for p in method.params})
        if self.ghost_bn and self.sync_bn:
            raise UserError(f"--ghost-bn {self.ghost_bn} and --sync-bn true contradict each other (BatchNorm over "
                            "chunks of one process's batch vs over every process's batch): choose one")
        self.ghost_bn_splits()
        if self.attack_budget == "fixed" and self.attack_step_size <= 0:
            raise UserError(f"--attack-step-size {eps_text(self.attack_step_size, self.norm)} must be > 0 with "
                            "--attack-budget fixed")
        return self

    def _validate_ranges(self) -> None:
        for key, value in self.to_dict().items():
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{_flag(key)} must be a finite number, got {value}")
        for key, param in _declared().items():
            param.check(f"--{_flag(key)}", self.method_params[key])
        for name in ("epochs", "batch_size", "lr", "tau", "attack_steps"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("ghost_bn", "awp_gamma", "weight_decay", "val_size", "eval_subset", "checkpoint_every_steps",
                     "warmup_epochs", "aug_weight", "awp_warmup", "avg_start_epoch", "step_ema_warmup",
                     "eval_pgd_steps", "keep_checkpoints", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.workers < -1:
            raise UserError(f"--workers must be >= 0, or -1 for auto, got {self.workers}")
        for name in ("avg_decay", "step_ema_decay", "generated_fraction", "label_smoothing", "lr_decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"--{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")

    def ghost_bn_splits(self, world_size: int = 1) -> int:
        """BatchNorm calls per training forward of one process with ``ghost_bn`` (1: plain BatchNorm).

        A full batch of ``batch_size / world_size`` images per process (twice that with two-view
        ``autoaug`` batches) is split into this many chunks of ``ghost_bn`` images, the way
        ``nn.DataParallel`` scatters a batch over that many GPUs.
        """
        if not self.ghost_bn:
            return 1
        views = 2 if self.augment == "autoaug" else 1
        share = self.batch_size // world_size * views
        if share % self.ghost_bn:
            where = f" per process ({world_size} processes)" if world_size > 1 else ""
            raise UserError(f"--ghost-bn {self.ghost_bn} does not divide the {share} images of a training forward"
                            f"{where} (--batch-size {self.batch_size}" + (", two views" if views == 2 else "")
                            + "): choose a divisor of it, or --ghost-bn 0")
        return share // self.ghost_bn

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able values, one per key (tuples become lists; method parameters follow ``loss``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "method_params":
                out.update(value)
            else:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """The config of a mapping of keys (old keys read as their new names; values coerced)."""
        if not isinstance(d, dict):
            raise UserError(f"a config must be a mapping of keys to values, got {type(d).__name__} {d!r:.80}")
        d, _ = upgrade_keys(d, str(d.get("loss", cls.loss)))
        unknown = sorted(set(d) - set(config_keys()))
        if unknown:
            raise UserError(f"unknown config key(s) {', '.join(unknown)}; see --print-config for the keys")
        return cls(**_coerce_all(cls, d))


def _declared() -> dict[str, Param]:
    """Config key -> parameter of every registered method; a key may not shadow a field."""
    declared = declared_parameters()
    clash = sorted(set(declared) & {f.name for f in fields(TrainConfig)})
    if clash:
        raise ValueError(f"method parameter key(s) {', '.join(clash)} clash with TrainConfig fields")
    return declared


def config_keys() -> list[str]:
    """Every key of a config, in the order of ``config.yaml``."""
    return list(TrainConfig().to_dict())


def upgrade_keys(values: dict[str, Any], loss: str) -> tuple[dict[str, Any], list[str]]:
    """``values`` with keys of earlier versions renamed (``beta`` -> ``gkl_ce_weight``, or ``mart_kl_weight``
    for ``loss`` mart), in order (where a mapping holds both names the later one wins), and the renames."""
    out: dict[str, Any] = {}
    renames = []
    for key, value in values.items():
        new = None if key in TrainConfig.__dataclass_fields__ else key_for_old_name(key, loss)
        if new is not None:
            renames.append(f"{key} -> {new}")
            out.pop(new, None)
        out[new or key] = value
    return out, renames


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _coerce(name: str, tp: Any, value: Any, norm: str = "Linf") -> Any:
    if value is None:
        return None
    if get_origin(tp) is tuple:  # tuple[int, ...]: a YAML list or "75,90" on the command line
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        return tuple(_coerce(name, get_args(tp)[0], v, norm) for v in items)
    if get_origin(tp) is not None:  # Optional[X]
        tp = next(a for a in get_args(tp) if a is not type(None))
    if name in ("eps", "attack_step_size"):  # in the notation of the run's norm (8/255, 0.5, 12)
        return parse_eps(value, norm)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(value, (bool, list, dict)):  # YAML can hold these where a number or a name belongs
            raise TypeError
        if tp is int:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        return tp(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"--{name.replace('_', '-')} expects {tp.__name__}, got {value!r}") from None


def _coerce_all(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    hints = {**get_type_hints(cls), **{k: p.type for k, p in _declared().items()}}
    norm = str(d.get("norm", "Linf"))
    norm = norm if norm in NORMS else "Linf"  # an unknown norm is reported by validate()
    return {k: _coerce(k, hints[k], v, norm) for k, v in d.items()}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per config key (the methods' parameters with their declared help), all defaulting
    to None (= keep the preset's value), and the flags of old keys (``--alpha``, ``--beta``, ...) hidden."""
    hints = get_type_hints(TrainConfig)
    group = parser.add_argument_group("config overrides (any key of the config)")
    for f in fields(TrainConfig):
        if f.name in ("preset", "method_params"):
            continue
        metavar = "BOOL" if hints[f.name] is bool else f.name.upper()
        group.add_argument(f"--{_flag(f.name)}", dest=f"cfg_{f.name}", default=None, metavar=metavar,
                           help=f"(default {f.default!r})")
    methods = parser.add_argument_group("training-method parameters (--loss decides which apply)")
    seen: set[str] = set()
    old_keys: set[str] = set()
    for method in METHODS.values():
        for p in method.params:
            key = method.key(p.name)
            if key in seen:  # shared by methods with one prefix (gkl, ikl, dkl)
                continue
            seen.add(key)
            users = ", ".join(m.name for m in METHODS.values() if key in {m.key(q.name) for q in m.params})
            was = f"; was --{', --'.join(_flag(k) for k in p.old_keys)}" if p.old_keys else ""
            limits = f", {p.range_text()}" if p.range_text() else ""
            methods.add_argument(f"--{_flag(key)}", dest=f"cfg_{key}", default=None,
                                 metavar="BOOL" if p.type is bool else p.type.__name__.upper(),
                                 help=f"{users}: {p.help} (default {p.default!r}{limits}{was})")
            old_keys.update(p.old_keys)
    for key in sorted(old_keys):
        group.add_argument(f"--{_flag(key)}", dest=f"cfg_{key}", default=None, help=argparse.SUPPRESS)


def build_config(preset: Optional[str], args: argparse.Namespace, base: Optional[dict] = None) -> TrainConfig:
    """``base`` values, then the preset's, then the command line's; type-checked and validated.

    Old keys are renamed in each of the three before they are merged (so ``--gkl-ce-weight`` on the
    command line overrides ``beta`` in a file, and ``--beta`` overrides ``gkl_ce_weight``), with one note.
    """
    layers = [dict(base or {})]
    if preset is not None:
        layers.append({**load_preset(preset), "preset": preset})
    layers.append({k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None})
    loss = next((str(layer["loss"]) for layer in reversed(layers) if "loss" in layer), TrainConfig.loss)
    values: dict[str, Any] = {}
    renames: list[str] = []
    for layer in layers:
        upgraded, done = upgrade_keys(layer, loss)
        values.update(upgraded)
        renames += done
    cfg = TrainConfig.from_dict(values).validate()  # a bad value: its error is the only line
    if renames and os.environ.get("RANK", "0") == "0":
        print(f"note: old config key(s) read under their new names: {', '.join(dict.fromkeys(renames))} "
              "(the old names keep working; see --print-config)", file=sys.stderr)
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
