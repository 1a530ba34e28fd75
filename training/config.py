"""One typed config: a dataclass filled from a YAML preset plus command-line overrides.

``--preset NAME`` reads ``configs/NAME.yaml``; every field is also a flag (``--epochs 5``,
``--alpha 12``, ``--eps 8/255``). The resolved config is saved as ``config.yaml`` in the run
folder, so a run can be reproduced (and evaluated) from its folder alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints

import yaml

from core.files import atomic_write_text
from core.flags import SEED_LIMIT, STEPS_LIMIT, check_count
from core.threat import NORMS, eps_text, parse_eps  # noqa: F401  (parse_eps: part of this module's API)
from errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

EPS_SCHEDULES = ("linear", "constant")
ATTACK_BUDGETS = ("effective", "staged", "low", "fixed")
LR_SCHEDULES = ("cosine-epoch", "cosine-step", "cosine-trades", "onecycle", "step", "constant")
AVERAGING = ("epoch-ema", "step-ema", "none")
WEIGHT_SOURCES = ("class", "sample", "uniform")
AMP_MODES = ("auto", "bf16", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AWP_PROXY_VIEWS = ("split", "joint")
GENERATED_EPOCHS = ("real-pass", "dataset-size")
# Upper bounds of the counts: far beyond any real run, they stop a typo from running for ever or overflowing.
COUNT_LIMITS = {"seed": SEED_LIMIT, "epochs": 100_000, "batch_size": 1 << 20, "attack_steps": STEPS_LIMIT,
                "eval_pgd_steps": STEPS_LIMIT, "workers": 1024, "ghost_bn": 1 << 20, "val_size": 1 << 31,
                "eval_subset": 1 << 31, "checkpoint_every_steps": 1 << 40, "keep_checkpoints": 100_000,
                "warmup_epochs": 100_000, "awp_warmup": 100_000, "avg_start_epoch": 100_000,
                "step_ema_warmup": 1 << 40}


@dataclass
class TrainConfig:
    """Every setting of a training run (defaults: the paper's CIFAR-100 GKL-AT row)."""

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
    arch: str = "wrn-34-10"
    sync_bn: bool = False
    ghost_bn: int = 0  # images per BatchNorm call in a full batch of one process (DataParallel's per-GPU batch); 0: off
    # loss
    loss: str = "gkl"
    alpha: float = 20.0  # wMSE weight (paper's name)
    beta: float = 5.0  # soft-label CE weight (paper's name)
    gamma: float = 1.0  # smoothing exponent of the weights
    tau: float = 4.0  # temperature of the class-wise score bank
    weight_source: str = "class"  # class (bank) | sample | uniform
    trades_beta: float = 6.0  # KL weight of the `trades` loss
    attack_alpha: float = 1.0  # wMSE weight of the GKL-family training attack (paper's name)
    attack_beta: float = 1.0  # soft-label CE weight of the GKL-family training attack (paper's name)
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
    preset: Optional[str] = None

    def validate(self) -> "TrainConfig":
        from data import AUGMENTATIONS, DATASETS
        from models import MODELS

        from .methods import METHODS

        choices = {"dataset": DATASETS, "augment": AUGMENTATIONS, "arch": tuple(MODELS), "loss": tuple(METHODS),
                   "eps_schedule": EPS_SCHEDULES, "attack_budget": ATTACK_BUDGETS,
                   "lr_schedule": LR_SCHEDULES, "averaging": AVERAGING, "weight_source": WEIGHT_SOURCES,
                   "amp": AMP_MODES, "norm": NORMS, "compile_mode": COMPILE_MODES,
                   "awp_proxy_views": AWP_PROXY_VIEWS, "generated_epoch": GENERATED_EPOCHS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not one of: "
                                f"{', '.join(allowed)}")
        self._validate_ranges()
        if self.warmup_epochs >= self.epochs:
            raise UserError(f"--warmup-epochs {self.warmup_epochs} must be smaller than --epochs {self.epochs}")
        if self.lr_schedule == "step" and not self.lr_milestones:
            raise UserError("--lr-schedule step needs --lr-milestones, e.g. --lr-milestones 75,90")
        if any(m < 1 for m in self.lr_milestones):
            raise UserError(f"--lr-milestones must be epochs >= 1, got {','.join(map(str, self.lr_milestones))}")
        if self.attack_alpha == 0 and self.attack_beta == 0:
            raise UserError("--attack-alpha and --attack-beta are both 0: the GKL attack would maximise nothing; "
                            "set one of them > 0 (the released CIFAR-10 script: --attack-alpha 0 --attack-beta 1)")
        if self.ghost_bn and self.sync_bn:
            raise UserError(f"--ghost-bn {self.ghost_bn} and --sync-bn true contradict each other (BatchNorm over "
                            "chunks of one process's batch vs over every process's batch): choose one")
        self.ghost_bn_splits()
        if self.attack_budget == "fixed" and self.attack_step_size <= 0:
            raise UserError(f"--attack-step-size {eps_text(self.attack_step_size, self.norm)} must be > 0 with "
                            "--attack-budget fixed")
        return self

    def _validate_ranges(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{_flag(f.name)} must be a finite number, got {value}")
        for name in ("epochs", "batch_size", "lr", "tau", "attack_steps"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("alpha", "beta", "trades_beta", "attack_alpha", "attack_beta", "ghost_bn", "awp_gamma",
                     "weight_decay", "val_size", "eval_subset", "checkpoint_every_steps", "warmup_epochs",
                     "aug_weight", "awp_warmup", "avg_start_epoch", "step_ema_warmup", "eval_pgd_steps",
                     "keep_checkpoints", "seed"):
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.workers < -1:
            raise UserError(f"--workers must be >= 0, or -1 for auto, got {self.workers}")
        for name in ("gamma", "avg_decay", "step_ema_decay", "generated_fraction", "label_smoothing", "lr_decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"--{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        for name, limit in COUNT_LIMITS.items():
            check_count(f"--{_flag(name)}", getattr(self, name), limit)

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
        """Plain YAML-able values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise UserError(f"a config must be a mapping of keys to values, got {type(d).__name__} {d!r:.80}")
        odd = [k for k in d if not isinstance(k, str)]
        if odd:
            raise UserError(f"config key {odd[0]!r} is not a name: config keys are names like epochs or alpha; "
                            "see --print-config for the keys")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown config key(s) {', '.join(unknown)}; see --print-config for the keys")
        return cls(**_coerce_all(cls, d))


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
            if isinstance(value, int) or str(value).strip().lstrip("+-").isdigit():
                return int(value)  # exactly, however large (a float would round it)
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        return tp(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"--{name.replace('_', '-')} expects {tp.__name__}, got {value!r}") from None


def _coerce_all(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    hints = get_type_hints(cls)
    norm = str(d.get("norm", "Linf"))
    norm = norm if norm in NORMS else "Linf"  # an unknown norm is reported by validate()
    return {k: _coerce(k, hints[k], v, norm) for k, v in d.items()}


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The keys of ``configs/NAME.yaml``; an unknown name is a ``UserError`` listing the presets."""
    if name not in list_presets():
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return load_yaml(CONFIG_DIR / f"{name}.yaml")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of config keys; unreadable, malformed or non-mapping files are a ``UserError``."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"config {path} is not a text file (binary bytes where YAML was expected): pass a YAML "
                        "file of config keys") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"config {path} is not valid YAML{line}: fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} holds a {type(data).__name__}, not a mapping of config keys to values")
    return data


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per config field, all defaulting to None (= keep the preset's value)."""
    hints = get_type_hints(TrainConfig)
    group = parser.add_argument_group("config overrides (any key of the config)")
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        tp = hints[f.name]
        metavar = "BOOL" if tp is bool else f.name.upper()
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None,
                           metavar=metavar, help=f"(default {f.default!r})")


def build_config(preset: Optional[str], args: argparse.Namespace, base: Optional[dict] = None) -> TrainConfig:
    """Preset (or ``base``) values, then command-line overrides; type-checked and validated."""
    values: dict[str, Any] = dict(base or {})
    if preset is not None:
        values.update(load_preset(preset))
        values["preset"] = preset
    for f in fields(TrainConfig):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is not None:
            values[f.name] = v
    return TrainConfig.from_dict(values).validate()


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
