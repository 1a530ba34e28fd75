"""One typed evaluation config: which model, which attacks at which radii, on which points (eval_autoattack.py).

Every field is a flag (:mod:`core.flags`). The config is validated once (:meth:`EvalConfig.validate`),
then resolved against the loaded model (:meth:`EvalConfig.resolved`: the threat models default to the
run's training norm, in whose notation the radii are read; the dataset and data folder come from the
checkpoint), saved resolved as ``OUT/config.yaml``, printed by ``--print-config`` and read back by
``--resume`` (flags given with ``--resume`` override the saved values; the saved radii and chunk size
must then stay, see :func:`evaluation.store.check_resume`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from checkpoints.run import WEIGHTS, default_out_dir
from core.flags import SEED_LIMIT, STEPS_LIMIT, check_count
from core.threat import NORMS, STANDARD_EPS, eps_text, parse_eps, parse_radii
from core.tracking import require as require_tracker
from data import DATASETS
from errors import UserError

from .corruptions import CORRUPTIONS_ATTACK, CorruptionSettings
from .inputs import SPLITS
from .results import SuiteSettings
from .sharding import DEFAULT_CHUNK_SIZE
from .spec import attack_examples, parse_attacks

CONFIG_NAME = "config.yaml"
DEFAULT_OUT = "eval"
RUN_OPTIONS = ("out", "resume", "device", "quiet", "tracker")  # how this invocation runs: neither saved nor read back
# Upper bounds of the counts (a typo must not allocate the machine's memory or run for ever).
COUNT_LIMITS = {"n_ex": 10**9, "batch_size": 1 << 20, "chunk_size": 1 << 30, "seed": SEED_LIMIT}


def _meta(text: Union[str, Callable[[], str]], **more: Any) -> dict[str, Any]:
    """A field's metadata for :mod:`core.flags`: its --help line and more (choices, metavar, positional)."""
    return {"help": text, **more}


@dataclass
class EvalConfig:
    """Every setting of one evaluation (defaults: AutoAttack at the run's RobustBench radius)."""

    source: Optional[str] = field(default=None, metadata=_meta(
        "run folder, project checkpoint .pt, or plain state dict .pt", positional=True))
    robustbench_model: Optional[str] = field(default=None, metadata=_meta(
        "a RobustBench model-zoo name instead of SOURCE", metavar="NAME"))
    model_dir: str = field(default="./models", metadata=_meta("RobustBench model folder (default ./models)"))
    eps: Optional[list[str]] = field(default=None, metadata=_meta(
        "radii in the norm's notation: Linf 8, 8/255 or 0.0314; L2 0.5; L1 12. With several --norm write "
        "NORM:RADIUS (Linf:8/255 L2:0.5). Default: RobustBench's 8/255, 0.5 and 12"))
    attacks: list[str] = field(default_factory=lambda: ["aa"], metadata=_meta(
        lambda: f"from: {attack_examples()}, and {CORRUPTIONS_ATTACK} (CIFAR-10-C/100-C from --data-dir) "
                "(default aa)"))
    n_ex: Optional[int] = field(default=None, metadata=_meta(
        "evaluate the first N points (default all); with corruptions: per corruption and severity"))
    batch_size: int = field(default=256, metadata=_meta("images per forward (default 256)"))
    seed: int = field(default=0, metadata=_meta("seed of the randomised attacks (default 0)"))
    norm: Optional[list[str]] = field(default=None, metadata=_meta(
        "one or more threat models, the first is the report's main one (default: the run's training norm, "
        "else Linf)", choices=NORMS))
    corruptions: Optional[list[str]] = field(default=None, metadata=_meta(
        f"with --attacks {CORRUPTIONS_ATTACK}: a subset of the 15 (default all: RobustBench's figure)",
        metavar="NAME"))
    severities: Optional[list[int]] = field(default=None, metadata=_meta(
        f"with --attacks {CORRUPTIONS_ATTACK}: a subset of the severities 1-5 (default all)", metavar="S"))
    chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata=_meta(
        f"points per chunk, the unit of work, seeding and resume (default {DEFAULT_CHUNK_SIZE}); results "
        "depend on it, never on the number of processes"))
    dataset: Optional[str] = field(default=None, metadata=_meta("default: the checkpoint's dataset",
                                                                choices=DATASETS))
    data_dir: Optional[str] = field(default=None, metadata=_meta("default: the run's data_dir, else ./datasets"))
    split: str = field(default="test", metadata=_meta("test (default) or train", choices=SPLITS))
    weights: str = field(default="avg", metadata=_meta("averaged (default) or raw weights", choices=WEIGHTS))
    checkpoint: str = field(default="last", metadata=_meta("last (default), best, or epoch_NNNN in a run folder"))
    arch: Optional[str] = field(default=None, metadata=_meta(
        "architecture of a plain state dict: a registry name (e.g. wrn-34-10) or MODULE:CALLABLE (e.g. "
        "my_nets.py:make), a function or class returning the model"))
    arch_kwargs: Optional[str] = field(default=None, metadata=_meta(
        "keyword arguments of a MODULE:CALLABLE architecture, a JSON object (e.g. '{\"width\": 64}')",
        metavar="JSON"))
    out: Optional[str] = field(default=None, metadata=_meta("output folder (default RUN/eval)"))
    resume: bool = field(default=False, metadata=_meta(
        f"continue the evaluation in --out: its {CONFIG_NAME} gives every setting not given here, finished "
        "results and AutoAttack state are reused"))
    save_adv: bool = field(default=False, metadata=_meta("save adversarial examples under --out/adv"))
    device: str = field(default="auto", metadata=_meta("auto (cuda when available), cpu, cuda, cuda:1 ..."))
    quiet: bool = field(default=False, metadata=_meta("no progress bars or per-attack lines"))
    tracker: str = field(default="tensorboard", metadata=_meta(
        "where the accuracies also go: tensorboard (OUT/tb, the default), wandb, mlflow or none "
        "(evaluation/tracking.py)"))

    # ------------------------------------------------------------------------------- checks
    def validate(self) -> "EvalConfig":
        """Check every setting that needs no model, before anything is loaded or written."""
        require_tracker(self.tracker)
        if (self.source is None) == (self.robustbench_model is None):
            raise UserError("pass exactly one model: a SOURCE path or --robustbench-model NAME")
        for f in dataclasses.fields(self):
            allowed, value = f.metadata.get("choices"), getattr(self, f.name)
            for v in [] if allowed is None or value is None else value if isinstance(value, list) else [value]:
                if v not in allowed:
                    raise UserError(f"--{f.name.replace('_', '-')} {v!r} is not one of: {', '.join(allowed)}")
        if self.n_ex is not None and self.n_ex <= 0:
            raise UserError(f"--n-ex must be a positive number of images, got {self.n_ex}")
        for name, least in (("batch_size", 1), ("chunk_size", 1), ("seed", 0)):
            if getattr(self, name) < least:
                raise UserError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        for name, limit in COUNT_LIMITS.items():
            if getattr(self, name) is not None:
                check_count(f"--{name.replace('_', '-')}", getattr(self, name), limit)
        for spec in parse_attacks(self.attack_names()):
            if spec.steps > STEPS_LIMIT:
                raise UserError(f"--attacks {spec.name}: {spec.steps} steps is above the limit of {STEPS_LIMIT:,}: "
                                "pass fewer steps")
        self.corruption_settings()
        if self.corruptions or self.severities:
            if not self.with_corruptions:
                raise UserError(f"--corruptions and --severities choose what --attacks {CORRUPTIONS_ATTACK} "
                                f"evaluates: add {CORRUPTIONS_ATTACK} to --attacks")
        if self.chosen_norms() is not None:
            self.suites()
        else:  # read in the run's training norm once it is known; a value no norm reads is wrong already
            for text in self.eps or []:
                _readable_in_some_norm(text)
        return self

    def attack_names(self) -> list[str]:
        """The attacks of the suites (``corruptions`` is a section of its own)."""
        return [a for a in self.attacks if a.strip().lower() != CORRUPTIONS_ATTACK]

    @property
    def with_corruptions(self) -> bool:
        """Whether ``--attacks`` asks for the common corruptions."""
        return any(a.strip().lower() == CORRUPTIONS_ATTACK for a in self.attacks)

    def chosen_norms(self) -> Optional[list[str]]:
        """``--norm``, else the norms that ``--eps NORM:RADIUS`` values name, else None (the run decides)."""
        if self.norm:
            return list(dict.fromkeys(self.norm))
        if self.eps and all(":" in e for e in self.eps):
            return list(dict.fromkeys(e.split(":", 1)[0].strip() for e in self.eps))
        return None

    # ------------------------------------------------------------------------------- settings
    def suites(self) -> list[SuiteSettings]:
        """The suite settings per norm (the main norm first); radii are read in their norm's notation."""
        norms = self.chosen_norms() or ["Linf"]
        radii = parse_radii(self.eps, norms)
        return [SuiteSettings.build(radii[n], self.attack_names(), norm=n, seed=self.seed,
                                    batch_size=self.batch_size, chunk_size=self.chunk_size) for n in norms]

    def corruption_settings(self) -> Optional[CorruptionSettings]:
        """The corruption section's settings, or None without ``--attacks corruptions``."""
        if not self.with_corruptions:
            return None
        return CorruptionSettings.build(self.corruptions, self.severities, n_ex=self.n_ex, batch_size=self.batch_size)

    def out_dir(self) -> Path:
        """``--out``, else ``RUN/eval`` (``eval_<stem>`` beside a checkpoint file, ``eval/NAME`` for a zoo model)."""
        if self.out:
            return Path(self.out)
        if self.robustbench_model:
            return Path(DEFAULT_OUT) / self.robustbench_model
        return default_out_dir(self.source, DEFAULT_OUT)

    def resolved(self, info: dict[str, Any]) -> "EvalConfig":
        """This config with what the loaded model decides filled in: norms (the run's training norm by default),
        every norm's radii (RobustBench's by default), the dataset and the data folder."""
        config = info.get("config") or {}
        norms = self.chosen_norms() or [config.get("norm") or "Linf"]
        radii = parse_radii(self.eps, norms)  # raises for radii the norm does not read
        given = list(self.eps or [])
        if len(norms) == 1:
            eps = given or [eps_text(STANDARD_EPS[norms[0]], norms[0])]
        else:
            named = {e.split(":", 1)[0].strip() for e in given}
            eps = given + [f"{n}:{eps_text(radii[n][0], n)}" for n in norms if n not in named]
        dataset = self.dataset or info.get("dataset") or config.get("dataset")
        if dataset is None:
            raise UserError("cannot tell which dataset this model was trained on: pass --dataset")
        return dataclasses.replace(self, norm=norms, eps=eps, dataset=dataset,
                                   data_dir=self.data_dir or config.get("data_dir") or "./datasets")

    # ------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        """The saved settings (``RUN_OPTIONS`` left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_OPTIONS}

    def to_yaml(self) -> str:
        """The saved settings as ``OUT/config.yaml`` holds them (and ``--print-config`` prints them)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "the command line") -> "EvalConfig":
        """A config from plain values, type-checked (``where`` names their origin in errors)."""
        if not isinstance(values, dict):
            raise UserError(f"{where} holds a {type(values).__name__}, not a mapping of config keys to values")
        hints = get_type_hints(cls)
        unknown = sorted(str(k) for k in values if k not in hints)
        if unknown:
            raise UserError(f"unknown evaluation config key(s) {', '.join(unknown)} in {where}; see --print-config")
        for key, value in values.items():
            if not _fits(hints[key], value):
                raise UserError(f"{key}: {value!r} in {where} is not a {_type_name(hints[key])}")
        return cls(**values)


def read_saved(out: Path) -> dict[str, Any]:
    """The settings saved in ``OUT/config.yaml`` (empty when the folder has none: an older evaluation)."""
    path = out / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0][:160]} (fix or delete it, or drop "
                        "--resume)") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path} holds no settings: delete it, or drop --resume")
    EvalConfig.from_dict(data, str(path))
    return data


def _readable_in_some_norm(text: str) -> None:
    """Raise the L-inf reading's error for a radius that no norm reads."""
    try:
        parse_eps(text, "Linf")
    except UserError as linf_error:
        for norm in NORMS[1:]:
            try:
                parse_eps(text.partition(":")[2] or text, norm)
                return
            except UserError:
                continue
        raise linf_error from None


def _fits(tp: Any, value: Any) -> bool:
    if get_origin(tp) is Union:
        return value is None or any(_fits(a, value) for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is list:
        return isinstance(value, list) and all(_fits(get_args(tp)[0], v) for v in value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Union:
        tp = next(a for a in get_args(tp) if a is not type(None))
    return str(tp).replace("typing.", "") if get_origin(tp) else tp.__name__
