"""RobustBench export: weights in RobustBench's key layout, model-zoo entry, ``model_info``, claim.

From a trained model this module writes what a RobustBench submission consists of:

* the weights as a plain state dict that RobustBench's own architecture class loads with
  ``strict=True`` (``wide_resnet.WideResNet``, ``dm_wide_resnet.DMWideResNet``,
  ``resnet.PreActResNet``), as ``.pt`` or ``.safetensors``;
* the model-zoo entry to paste into ``robustbench/model_zoo/<dataset>.py`` (the constructor call);
* ``model_info`` JSON in the format of RobustBench's ``model_info/<dataset>/<threat>/<name>.json``
  (percentages as strings with two decimals, eps as ``"8/255"`` or ``"0.5"``);
* a claim: ``robustbench.eval.benchmark`` run on the exported file itself, offline.

Every export is checked: the written file is loaded strictly into RobustBench's class and its
logits are compared with this project's model on a batch (fp32, TF32 off).
The layout mirrors RobustBench's repository: ``OUT/models/<dataset>/<threat>/<name>.pt`` and
``OUT/model_info/<dataset>/<threat>/<name>.json``, next to ``zoo_entry.py`` and ``export.json``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn

from errors import UserError

from .io import load_checkpoint, save_checkpoint

FORMATS = ("pt", "safetensors")
WEIGHT_CHOICES = ("avg", "raw", "last", "best")
RB_DATASETS = ("cifar10", "cifar100")
THREAT_MODELS = ("Linf", "L2")
STANDARD_EPS = {"Linf": 8 / 255, "L2": 0.5}
FULL_TEST_SET = 10_000  # RobustBench evaluates CIFAR-10/100 models on the whole test set
LOGIT_TOLERANCE = 1e-5
SUPPORTED = ("wrn-D-W (RobustBench wide_resnet.WideResNet: wrn-34-10, wrn-28-10, ...), "
             "wrn-D-W-silu (dm_wide_resnet.DMWideResNet: wrn-28-10-silu, ...), "
             "preact-resnet-18 (resnet.PreActResNet)")
_ARCH_PACKAGE = "robustbench.model_zoo.architectures"
_EPS_MATCH = 1e-6
_SHARED_FILE_MODE = 0o644  # exports are meant to be shared; mkstemp creates files as 0600
# model_info fields in RobustBench's order, with the JSON type of each ("pct": "73.85"-style string).
MODEL_INFO_FIELDS: dict[str, str] = {
    "link": "str", "name": "str", "authors": "str", "additional_data": "bool",
    "number_forward_passes": "int", "dataset": "str", "venue": "str", "architecture": "str",
    "eps": "str", "clean_acc": "pct", "reported": "pct", "autoattack_acc": "pct",
    "footnote": "str?", "unreliable": "bool",
}


class ExportMismatch(Exception):
    """The written weights do not reproduce this project's model in RobustBench's class (exit 1)."""

    exit_code = 1


# ----------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class Ref:
    """A name the constructor call refers to (``nn.SiLU``, ``CIFAR100_MEAN``, ``PreActBlockV2``)."""

    module: str
    name: str

    @property
    def source(self) -> str:
        return f"nn.{self.name}" if self.module == "torch.nn" else self.name

    def resolve(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)


@dataclass(frozen=True)
class RobustBenchArch:
    """One RobustBench architecture constructor call, buildable and printable as source."""

    module: str  # under robustbench.model_zoo.architectures
    class_name: str
    kwargs: tuple[tuple[str, Any], ...]  # literal values or ``Ref``
    display: str  # model_info "architecture", e.g. "WideResNet-34-10"

    def build(self) -> nn.Module:
        """A fresh RobustBench model (random init) of this architecture."""
        install_robustbench()
        cls = getattr(importlib.import_module(f"{_ARCH_PACKAGE}.{self.module}"), self.class_name)
        return cls(**{k: v.resolve() if isinstance(v, Ref) else v for k, v in self.kwargs})

    def call_source(self) -> str:
        """The constructor call as Python source, e.g. ``WideResNet(depth=34, ...)``."""
        args = ", ".join(f"{k}={v.source if isinstance(v, Ref) else _literal(v)}" for k, v in self.kwargs)
        return f"{self.class_name}({args})"

    def import_lines(self) -> list[str]:
        """Imports the call needs, as RobustBench's model-zoo files write them."""
        names: dict[str, set[str]] = {f"{_ARCH_PACKAGE}.{self.module}": {self.class_name}}
        for _, value in self.kwargs:
            if isinstance(value, Ref):
                names.setdefault(value.module, set()).add(value.name)
        return ["from torch import nn" if module == "torch.nn" else f"from {module} import {', '.join(sorted(found))}"
                for module, found in sorted(names.items())]


def _literal(value: Any) -> str:
    if isinstance(value, float):
        return np.format_float_positional(np.float32(value), trim="-")  # shortest text giving this float32
    if isinstance(value, tuple):
        return "(" + ", ".join(_literal(v) for v in value) + ")"
    return repr(value)


def install_robustbench() -> None:
    """Make ``import robustbench`` work here (it needs an ``autoattack`` package: see the bridge)."""
    from attacks import rb_bridge

    rb_bridge.install()


def robustbench_arch(model: nn.Module, arch_name: str = "") -> RobustBenchArch:
    """RobustBench's counterpart of a project model; ``UserError`` listing the supported ones otherwise."""
    from models.dm_wide_resnet import DMWideResNet
    from models.preact_resnet import PreActResNet
    from models.wide_resnet import WideResNet

    if isinstance(model, WideResNet):
        return _wrn_arch(model)
    if isinstance(model, DMWideResNet):
        return _dm_arch(model)
    if isinstance(model, PreActResNet) and [len(s) for s in _preact_stages(model)] == [2, 2, 2, 2]:
        return RobustBenchArch("resnet", "PreActResNet", (
            ("block", Ref(f"{_ARCH_PACKAGE}.resnet", "PreActBlockV2")), ("num_blocks", [2, 2, 2, 2]),
            ("num_classes", model.linear.out_features), ("bn_before_fc", True)), "PreActResNet-18")
    name = arch_name or type(model).__name__
    raise UserError(f"architecture {name!r} has no RobustBench counterpart; export supports: {SUPPORTED}")


def _preact_stages(model: nn.Module) -> list[nn.Sequential]:
    return [model.layer1, model.layer2, model.layer3, model.layer4]


def _wrn_arch(model: nn.Module) -> RobustBenchArch:
    depth = 6 * len(model.block1.layer) + 4
    width = model.block1.layer[0].conv1.out_channels // 16
    kwargs = (("depth", depth), ("widen_factor", width), ("num_classes", model.fc.out_features),
              ("sub_block1", False))
    return RobustBenchArch("wide_resnet", "WideResNet", kwargs, f"WideResNet-{depth}-{width}")


def _dm_arch(model: nn.Module) -> RobustBenchArch:
    blocks = model.layer[0].block
    depth, width = 6 * len(blocks) + 4, blocks[0].conv_0.out_channels // 16
    activation = type(model.relu)
    if activation not in (nn.SiLU, nn.ReLU):
        raise UserError(f"DMWideResNet activation {activation.__name__} has no RobustBench counterpart: "
                        "use silu or relu")
    kwargs = (("num_classes", model.logits.out_features), ("depth", depth), ("width", width),
              ("activation_fn", Ref("torch.nn", activation.__name__)),
              ("mean", _statistic(model.mean, "MEAN")), ("std", _statistic(model.std, "STD")))
    return RobustBenchArch("dm_wide_resnet", "DMWideResNet", kwargs, f"WideResNet-{depth}-{width}")


def _statistic(buffer: torch.Tensor, kind: str) -> Any:
    """RobustBench's named CIFAR constant when the values are exactly it, else a literal tuple.

    The values never travel in the state dict (non-persistent buffers), so the constructor call
    is the only place that carries them.
    """
    from models import dm_wide_resnet as ours

    values = buffer.detach().flatten().float().cpu()
    for dataset in ("CIFAR10", "CIFAR100"):
        name = f"{dataset}_{kind}"
        if torch.equal(values, torch.tensor(getattr(ours, name), dtype=torch.float32)):
            return Ref(f"{_ARCH_PACKAGE}.dm_wide_resnet", name)
    return tuple(float(v) for v in values.tolist())


def project_model_from_robustbench(rb_model: nn.Module) -> tuple[nn.Module, str]:
    """This project's model holding the weights of a RobustBench model (zoo interop).

    Supports RobustBench's ``WideResNet`` (without ``sub_block1``), ``DMWideResNet`` (SiLU or
    ReLU, its mean/std carried over) and ``PreActResNet`` with ``PreActBlockV2`` blocks. Returns
    ``(model in eval mode, architecture name)``; the name follows the registry's pattern
    (``wrn-34-10``, ``wrn-28-10-silu``) and may name a size the registry does not list.
    """
    model, name = _project_twin(rb_model)
    kind = type(rb_model).__name__
    try:
        model.load_state_dict(rb_model.state_dict(), strict=True)
    except RuntimeError as e:
        raise UserError(f"RobustBench {kind} does not load into {name}: {' '.join(str(e).split())[:200]}") from None
    device = _device_of(rb_model)
    model = model.to(device).eval()
    # Equal keys do not imply an equal forward pass (e.g. PreActBlock v1 vs v2 shortcuts).
    diff = max_logit_diff(model, rb_model, probe_batch(4, device))
    if not diff < LOGIT_TOLERANCE:
        raise UserError(f"RobustBench {kind} loads into {name} but computes different logits (max diff "
                        f"{diff:.3g}): this variant is not supported; supported: {SUPPORTED}")
    return model, name


def _project_twin(rb_model: nn.Module) -> tuple[nn.Module, str]:
    """An untrained project model of the RobustBench model's shape, and its architecture name."""
    from models.dm_wide_resnet import DMWideResNet
    from models.preact_resnet import PreActResNet
    from models.wide_resnet import WideResNet

    kind = type(rb_model).__name__
    if kind == "WideResNet" and not hasattr(rb_model, "sub_block1"):
        depth, width = 6 * len(rb_model.block1.layer) + 4, rb_model.block1.layer[0].conv1.out_channels // 16
        model, name = WideResNet(depth, width, rb_model.fc.out_features), f"wrn-{depth}-{width}"
    elif kind == "DMWideResNet" and getattr(rb_model, "padding", 0) == 0:
        blocks = rb_model.layer[0].block
        depth, width = 6 * len(blocks) + 4, blocks[0].conv_0.out_channels // 16
        act = {nn.SiLU: "silu", nn.ReLU: "relu"}.get(type(rb_model.relu))
        if act is None:
            raise UserError(f"DMWideResNet with activation {type(rb_model.relu).__name__} is not supported: "
                            "this project has silu and relu")
        model = DMWideResNet(rb_model.logits.out_features, depth, width, activation=act,
                             mean=rb_model.mean.flatten().tolist(), std=rb_model.std.flatten().tolist())
        name = f"wrn-{depth}-{width}" + ("-silu" if act == "silu" else "-relu")
    elif kind == "PreActResNet" and getattr(rb_model, "bn_before_fc", False):
        model, name = PreActResNet((2, 2, 2, 2), rb_model.linear.out_features), "preact-resnet-18"
    else:
        raise UserError(f"RobustBench architecture {kind} has no counterpart in this project; supported: {SUPPORTED}")
    return model, name


def _device_of(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- weights
def robustbench_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as independent, contiguous CPU tensors (RobustBench's key layout)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                 metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``state_dict`` atomically: ``.safetensors`` by suffix (with ``metadata``), else ``torch.save``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return save_checkpoint(dict(state_dict), path)
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _SHARED_FILE_MODE)
        save_file(dict(state_dict), tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an exported state dict (``.pt`` with ``weights_only=True``, or ``.safetensors``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise UserError(f"weights file not found: {path}")
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise UserError(f"cannot read {path}: {e} (the file is truncated or not safetensors)") from None
    state = load_checkpoint(path)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a plain state dict of tensors")
    return dict(state)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- verification
@contextmanager
def strict_fp32() -> Iterator[None]:
    """Turn TF32 off for matmuls and convolutions (restored on exit): comparisons are in real fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def max_logit_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between the fp32 logits of ``a`` and ``b`` on ``x`` (eval mode)."""
    a.eval()
    b.eval()
    with torch.no_grad(), strict_fp32(), torch.autocast(x.device.type, enabled=False):
        return (a(x).float() - b(x).float()).abs().max().item()


def probe_batch(n: int, device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """``n`` uniform random 32x32 RGB images in [0, 1] from a private generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g).to(device)


def load_into_robustbench(arch: RobustBenchArch, path: str | os.PathLike) -> nn.Module:
    """RobustBench's model with the weights file loaded strictly; ``ExportMismatch`` when it fails."""
    model = arch.build()
    try:
        model.load_state_dict(load_weights(path), strict=True)
    except RuntimeError as e:
        raise ExportMismatch(f"{path} does not load strictly into RobustBench's {arch.call_source()}: "
                             f"{' '.join(str(e).split())[:300]}") from None
    return model.eval()


def verify_export(model: nn.Module, arch: RobustBenchArch, path: str | os.PathLike, *,
                  n: int = 16, tolerance: float = LOGIT_TOLERANCE) -> float:
    """Load ``path`` into RobustBench's class and compare logits with ``model``; returns the max diff.

    Raises ``ExportMismatch`` when the load is not strict or the difference is >= ``tolerance``.
    """
    device = _device_of(model)
    rb_model = load_into_robustbench(arch, path).to(device)
    diff = max_logit_diff(model, rb_model, probe_batch(n, device))
    if not diff < tolerance:  # NaN fails too
        raise ExportMismatch(f"RobustBench's {arch.call_source()} with {path} gives logits up to {diff:.3g} "
                             f"away from this project's model (limit {tolerance:g} in fp32)")
    return diff


# ----------------------------------------------------------------------------- measured figures
@dataclass(frozen=True)
class Figures:
    """Measured accuracies (fractions in [0, 1]) at one threat model, and where they come from."""

    clean: float
    autoattack: float
    n: int
    eps: float
    norm: str
    source: str


def eps_text(eps: float, norm: str) -> str:
    """eps as model_info writes it: ``"8/255"`` for Linf, ``"0.5"`` for L2."""
    return f"{eps * 255:g}/255" if norm == "Linf" else f"{eps:g}"


def pct(fraction: float) -> str:
    """A fraction as model_info's percentage string with two decimals (``0.3918 -> "39.18"``)."""
    return f"{100.0 * fraction:.2f}"


def default_eval_report(source: str | os.PathLike) -> Path:
    """Where ``eval_autoattack.py SOURCE`` writes its ``report.json`` by default."""
    src = Path(source)
    if src.is_dir():
        return src / "eval" / "report.json"
    if src.parent.name == "checkpoints" and (src.parent.parent / "config.yaml").is_file():
        return src.parent.parent / "eval" / "report.json"
    return src.parent / f"eval_{src.stem}" / "report.json"


def read_eval_report(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON report of ``eval_autoattack.py``; ``UserError`` when unreadable."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read evaluation report {path}: {str(e).splitlines()[0][:200]} "
                        "(rerun eval_autoattack.py or pass another --eval-json)") from None
    if not isinstance(report, dict) or "results" not in report or "clean_accuracy" not in report:
        raise UserError(f"{path} is not a report.json written by eval_autoattack.py (no results/clean_accuracy)")
    return report


def check_report_model(report: Mapping[str, Any], info: Mapping[str, Any], path: Path) -> None:
    """Refuse a report that evaluated other weights than the ones being exported."""
    evaluated = report.get("model") or {}
    keys = ["arch", "weights", "epoch", "global_step"]
    differ = [f"{k} {evaluated.get(k)!r} there vs {info.get(k)!r} here"
              for k in keys if evaluated.get(k) != info.get(k)]
    if info.get("kind") == "state_dict" and Path(str(evaluated.get("path"))).name != Path(str(info.get("path"))).name:
        differ.append(f"file {evaluated.get('path')} there vs {info.get('path')} here")
    if differ:
        raise UserError(f"{path} evaluated other weights than this export takes ({'; '.join(differ)}): run "
                        "eval_autoattack.py with the same --weights/--checkpoint, or pass --eval-json of that run")


def figures_from_report(report: Mapping[str, Any], *, dataset: str, norm: str, eps: float,
                        path: Path) -> Figures:
    """Clean and standard-AutoAttack accuracy at ``eps`` from an evaluation report."""
    settings, data = report.get("settings") or {}, report.get("data") or {}
    if settings.get("norm") != norm:
        raise UserError(f"{path} evaluated the {settings.get('norm')} threat model, not {norm}: pass "
                        f"--norm {settings.get('norm')} or evaluate with --norm {norm}")
    if data.get("dataset") != dataset or data.get("split", "test") != "test":
        raise UserError(f"{path} evaluated {data.get('dataset')} {data.get('split')}, but RobustBench figures are "
                        f"on the {dataset} test split: rerun eval_autoattack.py with --dataset {dataset} --split test")
    rows = [r for r in report["results"] if r.get("attack") == "aa"]
    row = next((r for r in rows if abs(float(r["eps"]) - eps) < _EPS_MATCH), None)
    if row is None:
        have = ", ".join(eps_text(float(r["eps"]), norm) for r in rows) or "none"
        text = eps_text(eps, norm)
        raise UserError(f"{path} has no standard AutoAttack (aa) result at eps {text} (aa at: {have}): "
                        f"run eval_autoattack.py SOURCE --eps {text} --attacks aa, or pass --eps")
    return Figures(clean=float(report["clean_accuracy"]), autoattack=float(row["robust_accuracy"]),
                   n=int(report.get("n", row.get("n", 0))), eps=eps, norm=norm, source=str(path))


# ----------------------------------------------------------------------------- model card
@dataclass
class ModelCard:
    """The model_info fields only a human knows (paper, authors, venue...)."""

    link: str = ""
    name: str = ""
    authors: str = ""
    venue: str = ""
    additional_data: bool = False
    number_forward_passes: int = 1
    reported: Optional[float] = None  # robust accuracy in % as the paper reports it
    footnote: Optional[str] = None

    def missing(self) -> list[str]:
        """Human fields still empty."""
        return [k for k in ("link", "name", "authors", "venue") if not getattr(self, k).strip()]


def build_model_info(card: ModelCard, *, dataset: str, architecture: str, eps: float, norm: str,
                     figures: Optional[Figures]) -> dict[str, Any]:
    """model_info in RobustBench's field order and types; figures ``None`` leaves accuracies null."""
    reported = f"{card.reported:.2f}" if card.reported is not None else (
        pct(figures.autoattack) if figures else None)
    info: dict[str, Any] = {
        "link": card.link, "name": card.name, "authors": card.authors,
        "additional_data": bool(card.additional_data), "number_forward_passes": int(card.number_forward_passes),
        "dataset": dataset, "venue": card.venue, "architecture": architecture, "eps": eps_text(eps, norm),
        "clean_acc": pct(figures.clean) if figures else None, "reported": reported,
        "autoattack_acc": pct(figures.autoattack) if figures else None}
    if card.footnote:
        info["footnote"] = card.footnote
    info["unreliable"] = False
    return info


def validate_model_info(info: Mapping[str, Any], *, evaluated: bool = True) -> list[str]:
    """Problems of a model_info dict against RobustBench's fields and types (empty when valid)."""
    problems = [f"unknown field {k!r}" for k in info if k not in MODEL_INFO_FIELDS]
    for key, kind in MODEL_INFO_FIELDS.items():
        if key not in info:
            if not kind.endswith("?"):
                problems.append(f"missing field {key!r}")
            continue
        value = info[key]
        if kind == "pct":
            if value is None and not evaluated:
                continue
            if not isinstance(value, str) or not _is_percentage(value):
                problems.append(f"{key} must be a percentage string like '39.18', got {value!r}")
        elif kind in ("str", "str?") and not isinstance(value, str):
            problems.append(f"{key} must be a string, got {value!r}")
        elif kind == "bool" and not isinstance(value, bool):
            problems.append(f"{key} must be true or false, got {value!r}")
        elif kind == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{key} must be a positive integer, got {value!r}")
    if isinstance(info.get("eps"), str) and not _is_eps(info["eps"]):
        problems.append(f"eps must read like '8/255' or '0.5', got {info['eps']!r}")
    return problems


def _is_percentage(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and 0.0 <= value <= 100.0


def _is_eps(text: str) -> bool:
    num, _, den = text.partition("/")
    try:
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return False
    return value > 0


def zoo_entry_source(model_name: str, arch: RobustBenchArch, dataset: str, norm: str) -> str:
    """A Python file holding the model-zoo entry (``ENTRY``) to paste into RobustBench."""
    return "\n".join([
        f"# RobustBench model-zoo entry for {model_name} ({dataset}, {norm}), written by export_robustbench.py.",
        f"# Paste ENTRY's tuple into the `{norm.lower()}` list of robustbench/model_zoo/{dataset}.py",
        "# and set 'gdrive_id' to the shared file of the exported weights. The export loaded the weights",
        "# into exactly this constructor with strict=True and compared its logits with the trained model.",
        *arch.import_lines(), "",
        f"ENTRY = ({model_name!r}, {{",
        "    'model':",
        f"    lambda: {arch.call_source()},",
        "    'gdrive_id': None,",
        "})", ""])


# ----------------------------------------------------------------------------- claim
def claim_data_root(dataset: str, data_dir: str | os.PathLike) -> tuple[Path, int]:
    """Folder to give RobustBench's loader for the local test set, and the set's size.

    The files are checked here (MD5 included, no download), so RobustBench's own loader, which
    asks torchvision to download, finds them verified and never goes online.
    """
    if dataset not in RB_DATASETS:
        raise UserError(f"--claim needs a RobustBench dataset ({', '.join(RB_DATASETS)}), this model is {dataset}")
    from data.cifar import cifar_dataset

    test = cifar_dataset(dataset, train=False, data_dir=data_dir, download=False)
    return Path(test.root), len(test)


def run_claim(arch: RobustBenchArch, weights: str | os.PathLike, *, dataset: str, data_root: Path,
              norm: str, eps: float, n_examples: int = FULL_TEST_SET, batch_size: int = 256,
              device: torch.device | str = "cpu", work_dir: str | os.PathLike = ".") -> dict[str, Any]:
    """``robustbench.eval.benchmark`` (standard AutoAttack) on the exported file in RobustBench's class.

    Runs without an AutoAttack state file: robustbench 1.1.1 then computes the robust accuracy
    from the returned adversarial examples, whereas with a state file it calls ``mean()`` on the
    state's boolean flags, which PyTorch refuses. The AutoAttack log goes to ``work_dir``.
    Returns the claim as JSON-ready data.
    """
    from attacks import rb_bridge

    model = load_into_robustbench(arch, weights)
    install_robustbench()
    from robustbench.eval import benchmark

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(weights)
    log_path = work / "claim_autoattack.log"
    start = time.perf_counter()
    clean, robust = benchmark(model, n_examples=n_examples, dataset=dataset, threat_model=norm,
                              data_dir=str(data_root), device=torch.device(device), batch_size=batch_size,
                              eps=eps, log_path=str(log_path))
    return {"dataset": dataset, "threat_model": norm, "eps": eps_text(eps, norm), "n_examples": n_examples,
            "clean_acc": pct(clean), "autoattack_acc": pct(robust), "clean_accuracy": clean,
            "autoattack_accuracy": robust, "constructor": arch.call_source(), "weights": str(weights),
            "weights_sha256": sha, "autoattack": "git autoattack" if rb_bridge.uses_git_autoattack()
            else "pyautoattack through attacks.rb_bridge", "versions": _versions(), "device": str(device),
            "seconds": round(time.perf_counter() - start, 2), "autoattack_log": str(log_path),
            "created": _now()}


def _versions() -> dict[str, Optional[str]]:
    import importlib.metadata as md

    found = {}
    for package in ("robustbench", "pyautoattack", "torch"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = None
    return found


def _now() -> str:
    import datetime as dt

    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- export
@dataclass
class ExportRequest:
    """Everything one export needs; ``export_robustbench.py`` fills it from the command line."""

    source: str
    out: Optional[str] = None
    weights: str = "avg"  # avg | raw (of --checkpoint) | last (raw last.pt) | best (best.pt as selected)
    checkpoint: Optional[str] = None
    arch: Optional[str] = None
    dataset: Optional[str] = None
    model_name: Optional[str] = None
    eval_json: Optional[str] = None
    allow_unevaluated: bool = False
    norm: Optional[str] = None
    eps: Optional[float] = None
    fmt: str = "pt"
    card: ModelCard = field(default_factory=ModelCard)
    claim: bool = False
    data_dir: Optional[str] = None
    claim_n: int = FULL_TEST_SET
    batch_size: int = 256
    device: str = "cpu"
    verify_n: int = 16


@dataclass
class ExportResult:
    """Paths written, the verification figure, the model_info written and notes for the user."""

    out: Path
    weights: Path
    model_info_path: Path
    zoo_entry: Path
    record: Path
    claim_path: Optional[Path]
    max_abs_diff: float
    model_info: dict[str, Any]
    claim: Optional[dict[str, Any]]
    notes: list[str]


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def default_out(source: str | os.PathLike) -> Path:
    """``RUN/robustbench`` for a run folder (or a file in one), else ``robustbench_<stem>`` beside the file."""
    src = Path(source)
    if src.is_dir():
        return src / "robustbench"
    if src.parent.name == "checkpoints" and (src.parent.parent / "config.yaml").is_file():
        return src.parent.parent / "robustbench"
    return src.parent / f"robustbench_{src.stem}"


def default_model_name(source: str | os.PathLike) -> str:
    """The run folder's (or file's) name with characters outside ``[A-Za-z0-9_.-]`` made ``_``."""
    src = Path(source).resolve()
    if src.is_file():
        src = src.parent.parent if src.parent.name == "checkpoints" else src.with_suffix("")
    return "".join(c if c in _NAME_CHARS else "_" for c in src.name) or "model"


@dataclass
class _Plan:
    """Everything read and checked before the first file is written."""

    model: nn.Module
    info: dict[str, Any]
    arch: RobustBenchArch
    config: dict[str, Any]
    dataset: str
    norm: str
    eps: float
    evaluated: Optional[Figures]
    claim_data: Optional[tuple[Path, int]]
    name: str
    out: Path


def export(req: ExportRequest) -> ExportResult:
    """Write weights, zoo entry, model_info (and claim) for ``req``; see the module docstring.

    Raises ``UserError`` for bad input (before anything is written) and ``ExportMismatch`` when
    the written weights do not reproduce the model in RobustBench's class.
    """
    plan = _plan(req)
    out, name, arch = plan.out, plan.name, plan.arch
    weights = out / "models" / plan.dataset / plan.norm / f"{name}.{req.fmt}"
    save_weights(robustbench_state_dict(plan.model), weights, metadata={
        "format": "robustbench-state-dict", "constructor": arch.call_source(), "dataset": plan.dataset})
    diff = verify_export(plan.model, arch, weights, n=req.verify_n)
    zoo_entry = out / "zoo_entry.py"
    _write_text(zoo_entry, zoo_entry_source(name, arch, plan.dataset, plan.norm))
    claim = claim_path = None
    if plan.claim_data is not None:
        root, size = plan.claim_data
        claim = {"model_name": name, **run_claim(
            arch, weights, dataset=plan.dataset, data_root=root, norm=plan.norm, eps=plan.eps,
            n_examples=min(req.claim_n, size), batch_size=req.batch_size, device=_device_of(plan.model),
            work_dir=out)}
        claim_path = out / "claim.json"
        _write_text(claim_path, json.dumps(claim, indent=2) + "\n")
    figures = _claim_figures(claim, plan.eps, plan.norm, claim_path) if claim else plan.evaluated
    model_info = _model_info(req.card, plan.dataset, arch, plan.eps, plan.norm, figures)
    info_path = out / "model_info" / plan.dataset / plan.norm / f"{name}.json"
    _write_text(info_path, json.dumps(model_info, indent=2) + "\n")
    notes = _notes(req, plan.dataset, plan.config, plan.evaluated, claim)
    record = out / "export.json"
    _write_text(record, json.dumps(_record(req, plan, weights, diff, claim, notes), indent=2, default=str) + "\n")
    return ExportResult(out, weights, info_path, zoo_entry, record, claim_path, diff, model_info, claim, notes)


def _plan(req: ExportRequest) -> _Plan:
    _check_request(req)
    model, info = _load_for_export(req)
    arch = robustbench_arch(model, str(info.get("arch") or ""))
    config = dict(info.get("config") or {})
    dataset = req.dataset or info.get("dataset") or config.get("dataset")
    if dataset is None:
        raise UserError("cannot tell which dataset this model was trained on: pass --dataset")
    norm, eps = _threat_model(req, config)
    evaluated = _evaluation(req, info, dataset, norm, eps)
    claim_data = claim_data_root(dataset, req.data_dir or config.get("data_dir") or "./datasets") if req.claim \
        else None
    return _Plan(model, dict(info), arch, config, dataset, norm, eps, evaluated, claim_data,
                 req.model_name or default_model_name(req.source),
                 Path(req.out) if req.out else default_out(req.source))


def _check_request(req: ExportRequest) -> None:
    if req.fmt not in FORMATS:
        raise UserError(f"--format {req.fmt!r} is not one of: {', '.join(FORMATS)}")
    if req.weights not in WEIGHT_CHOICES:
        raise UserError(f"--weights {req.weights!r} is not one of: {', '.join(WEIGHT_CHOICES)}")
    if req.norm is not None and req.norm not in THREAT_MODELS:
        raise UserError(f"--norm {req.norm!r} is not one of: {', '.join(THREAT_MODELS)}")
    if req.model_name is not None and (not req.model_name or set(req.model_name) - _NAME_CHARS):
        raise UserError(f"--model-name {req.model_name!r} may only use letters, digits, '_', '-' and '.' "
                        "(RobustBench names look like Author2024Title_WRN-34-10)")
    for flag, value in (("--claim-n", req.claim_n), ("--batch-size", req.batch_size), ("--verify-n", req.verify_n),
                        ("--forward-passes", req.card.number_forward_passes)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if req.card.reported is not None and not 0 <= req.card.reported <= 100:
        raise UserError(f"--reported is a percentage in [0, 100], got {req.card.reported}")


def _load_for_export(req: ExportRequest) -> tuple[nn.Module, dict[str, Any]]:
    from data import NUM_CLASSES

    from .run import load_model

    checkpoint, kind = req.checkpoint or "last", req.weights
    if req.weights in ("last", "best"):
        if req.checkpoint not in (None, req.weights):
            raise UserError(f"--weights {req.weights} means checkpoints/{req.weights}.pt: drop --checkpoint "
                            f"{req.checkpoint}, or use --weights avg|raw with it")
        # last: the final iterate; best: best.pt with the weights its selection measured (averaged if any)
        checkpoint, kind = req.weights, ("raw" if req.weights == "last" else "avg")
    if req.dataset is not None and req.dataset not in NUM_CLASSES:
        raise UserError(f"--dataset {req.dataset!r} is not one of: {', '.join(NUM_CLASSES)}")
    from training.trainer import resolve_device

    num_classes = NUM_CLASSES[req.dataset] if req.dataset else None
    return load_model(req.source, weights=kind, checkpoint=checkpoint, arch=req.arch,
                      num_classes=num_classes, device=resolve_device(req.device))


def _threat_model(req: ExportRequest, config: Mapping[str, Any]) -> tuple[str, float]:
    """``--norm``/``--eps``, else the training run's, else RobustBench's standard (8/255, 0.5)."""
    norm = req.norm or config.get("norm") or "Linf"
    if req.eps is not None:
        return norm, float(req.eps)
    if config.get("eps") is not None and config.get("norm", "Linf") == norm:
        from training.config import parse_eps

        return norm, parse_eps(config["eps"])
    return norm, STANDARD_EPS[norm]


def _evaluation(req: ExportRequest, info: Mapping[str, Any], dataset: str, norm: str,
                eps: float) -> Optional[Figures]:
    path = Path(req.eval_json) if req.eval_json else default_eval_report(req.source)
    if not path.is_file():
        if req.eval_json:
            raise UserError(f"--eval-json {path} does not exist: pass the report.json of eval_autoattack.py")
        if req.allow_unevaluated or req.claim:
            return None
        raise UserError(f"no evaluation found at {path}: run eval_autoattack.py {req.source} --attacks aa first "
                        "(or pass --eval-json REPORT, --claim, or --allow-unevaluated)")
    report = read_eval_report(path)
    check_report_model(report, info, path)
    return figures_from_report(report, dataset=dataset, norm=norm, eps=eps, path=path)


def _claim_figures(claim: Mapping[str, Any], eps: float, norm: str, path: Optional[Path]) -> Figures:
    return Figures(clean=claim["clean_accuracy"], autoattack=claim["autoattack_accuracy"],
                   n=claim["n_examples"], eps=eps, norm=norm, source=str(path))


def _model_info(card: ModelCard, dataset: str, arch: RobustBenchArch, eps: float, norm: str,
                figures: Optional[Figures]) -> dict[str, Any]:
    model_info = build_model_info(card, dataset=dataset, architecture=arch.display, eps=eps, norm=norm,
                                  figures=figures)
    problems = validate_model_info(model_info, evaluated=figures is not None)
    if problems:
        raise UserError(f"model_info would be invalid: {'; '.join(problems)}")
    return model_info


def _notes(req: ExportRequest, dataset: str, config: Mapping[str, Any], evaluated: Optional[Figures],
           claim: Optional[Mapping[str, Any]]) -> list[str]:
    notes = []
    if dataset not in RB_DATASETS:
        notes.append(f"RobustBench has no {dataset} leaderboard: the model_info is for reference only")
    figures_n = claim["n_examples"] if claim else (evaluated.n if evaluated else None)
    if figures_n is None:
        notes.append("model_info has no accuracies (unevaluated): run eval_autoattack.py or --claim before submitting")
    elif figures_n < FULL_TEST_SET and dataset in RB_DATASETS:
        notes.append(f"accuracies come from {figures_n} test points; RobustBench reports all {FULL_TEST_SET}: "
                     "evaluate without --n-ex (or --claim with the default --claim-n) before submitting")
    if claim and evaluated:
        notes.append(f"claim (RobustBench, n={claim['n_examples']}): clean {claim['clean_acc']}%, AA "
                     f"{claim['autoattack_acc']}%; eval_autoattack (n={evaluated.n}): clean {pct(evaluated.clean)}%, "
                     f"AA {pct(evaluated.autoattack)}%; model_info uses the claim")
    missing = req.card.missing()
    if missing:
        notes.append(f"model_info fields left empty: {', '.join(missing)} (pass --{' --'.join(missing)})")
    if config.get("generated") and not req.card.footnote:
        notes.append("the run trained on generated data: say so with --footnote, e.g. \"It uses additional "
                     "50M synthetic images in training.\"")
    return notes


def _record(req: ExportRequest, plan: _Plan, weights: Path, diff: float,
            claim: Optional[Mapping[str, Any]], notes: list[str]) -> dict[str, Any]:
    """Provenance of the export: what was taken from where, and how it was checked."""
    info, evaluated = plan.info, plan.evaluated
    return {"created": _now(), "model_name": plan.name, "source": req.source, "checkpoint": info.get("path"),
            "weights_kind": info.get("weights"), "weights_choice": req.weights, "arch": info.get("arch"),
            "epoch": info.get("epoch"), "global_step": info.get("global_step"),
            "robustbench_constructor": plan.arch.call_source(), "weights_file": str(weights), "format": req.fmt,
            "weights_sha256": file_sha256(weights),
            "verification": {"max_abs_logit_diff": diff, "tolerance": LOGIT_TOLERANCE, "inputs": req.verify_n,
                             "strict_load": True, "dtype": "float32"},
            "dataset": plan.dataset, "threat_model": plan.norm, "eps": eps_text(plan.eps, plan.norm),
            "evaluation": None if evaluated is None else {
                "report": evaluated.source, "n": evaluated.n, "clean_accuracy": evaluated.clean,
                "autoattack_accuracy": evaluated.autoattack},
            "claim": None if claim is None else {k: claim[k] for k in ("n_examples", "clean_accuracy",
                                                                       "autoattack_accuracy")},
            "model_info_figures": "claim" if claim else ("evaluation" if evaluated else None), "notes": notes}


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _SHARED_FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
