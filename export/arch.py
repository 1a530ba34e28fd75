"""RobustBench architectures: which constructor call of RobustBench rebuilds a project model, and back.

``robustbench_arch(model)`` gives the :class:`RobustBenchArch` (module, class, keyword arguments)
whose class loads the model's state dict with ``strict=True``; ``project_model_from_robustbench``
goes the other way for zoo models. ``zoo_entry_source`` prints the model-zoo entry.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from core.device import module_device
from errors import UserError

from .boards import ZOO_LISTS

LOGIT_TOLERANCE = 1e-5
SUPPORTED = ("wrn-D-W (RobustBench wide_resnet.WideResNet: wrn-34-10, wrn-28-10, ...), "
             "wrn-D-W-silu (dm_wide_resnet.DMWideResNet: wrn-28-10-silu, ...), "
             "preact-resnet-18 (resnet.PreActResNet)")
_ARCH_PACKAGE = "robustbench.model_zoo.architectures"
# robustbench.utils.load_model refuses an entry whose gdrive_id is None even when the file is in place
GDRIVE_PLACEHOLDER = "FILL-IN-the-Google-Drive-id-of-the-uploaded-weights"


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
    device = module_device(rb_model)
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


def zoo_entry_source(model_name: str, arch: RobustBenchArch, dataset: str, norm: str | Sequence[str]) -> str:
    """A Python file holding the model-zoo entry (``ENTRY``) to paste into RobustBench, once per board.

    ``norm``: the board (``Linf``, ``L2``, ``corruptions``) or several; each board is its own list of
    ``robustbench/model_zoo/<dataset>.py`` (``linf``, ``l2``, ``common_corruptions``).
    """
    boards = [norm] if isinstance(norm, str) else list(norm)
    lists = " and ".join(f"`{ZOO_LISTS.get(b, b.lower())}`" for b in boards)
    return "\n".join([
        f"# RobustBench model-zoo entry for {model_name} ({dataset}, {', '.join(boards)}), written by "
        "export_robustbench.py.",
        f"# Paste ENTRY's tuple into the {lists} list{'s' if len(boards) > 1 else ''} of "
        f"robustbench/model_zoo/{dataset}.py",
        f"# and replace the gdrive_id placeholder with the Google Drive id of the uploaded {model_name}.pt.",
        *(["# The export loaded this entry through robustbench.utils.load_model from its models/ folder (the",
           "# weights in place, so nothing was downloaded) and compared the logits with the trained model."]
          if dataset in ("cifar10", "cifar100") else
          [f"# RobustBench has no {dataset} zoo: the export loaded the weights into this constructor with",
           "# strict=True and compared the logits with the trained model."]),
        *arch.import_lines(), "",
        f"ENTRY = ({model_name!r}, {{",
        "    'model':",
        f"    lambda: {arch.call_source()},",
        f"    'gdrive_id': {GDRIVE_PLACEHOLDER!r},",
        "})", ""])
