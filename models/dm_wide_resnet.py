"""WideResNet with SiLU and input normalisation, RobustBench's ``dm_wide_resnet.DMWideResNet`` layout.

This is the network of the DM-AT recipe (Wang et al. 2023) that the paper's generated-data rows
use. State-dict keys and the forward pass equal RobustBench's
``DMWideResNet(num_classes, depth, width, activation_fn=nn.SiLU, mean, std)``:

* the first 3x3 conv of each block pads by hand like TensorFlow's ``SAME``: (1,1,1,1) at stride 1
  but (0,1,0,1) at stride 2, which is *not* ``padding=1``;
* ``mean``/``std`` are non-persistent buffers (not in the state_dict), so an exported checkpoint
  relies on RobustBench's constructor using the same values. Default: CIFAR-100 statistics when
  ``num_classes == 100`` and CIFAR-10 statistics otherwise, as RobustBench's entries for the
  paper's WRN-28-10 models (``Cui2023Decoupled_WRN-28-10``) pass them.

Training-time details that are not part of the key layout follow the DM-AT code: BatchNorm
momentum 0.01 and the TRADES-style He initialisation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register
from .wide_resnet import global_avg_pool, trades_init

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU}

# name -> (depth, width)
DM_SIZES = {
    "wrn-28-10-silu": (28, 10),
    "wrn-70-16-silu": (70, 16),
    "wrn-16-4-silu": (16, 4),
}


def _same_pad(x: torch.Tensor, stride: int) -> torch.Tensor:
    if stride == 1:
        return F.pad(x, (1, 1, 1, 1))
    if stride == 2:
        return F.pad(x, (0, 1, 0, 1))
    raise ValueError(f"unsupported stride {stride}: DMWideResNet blocks use 1 or 2")


class _Block(nn.Module):
    """Pre-activation block; a width change projects the activated input with a 1x1 conv."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: type[nn.Module],
                 bn_momentum: float) -> None:
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=bn_momentum)
        self.relu_0 = activation()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=bn_momentum)
        self.relu_1 = activation()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False) if self.has_shortcut else None
        self._stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu_0(self.batchnorm_0(x))
        shortcut = self.shortcut(act) if self.shortcut is not None else x
        out = self.conv_0(_same_pad(act, self._stride))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return shortcut + out


class _BlockGroup(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int,
                 activation: type[nn.Module], bn_momentum: float) -> None:
        super().__init__()
        self.block = nn.Sequential(*[
            _Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, activation, bn_momentum)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def default_normalisation(num_classes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) RobustBench passes for a CIFAR model with ``num_classes`` outputs."""
    return (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)


class DMWideResNet(nn.Module):
    """WRN-``depth``-``width`` with ``activation`` (SiLU) that normalises its [0, 1] input itself.

    Pass ``mean=(0, 0, 0), std=(1, 1, 1)`` for no normalisation.
    """

    def __init__(self, num_classes: int = 10, depth: int = 28, width: int = 10, activation: str = "silu",
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 bn_momentum: float = 0.01) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DMWideResNet depth must be 6n+4 with n >= 1 (16, 28, 70, ...), got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        default_mean, default_std = default_normalisation(num_classes)
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
        self.register_buffer("mean", _channel_tensor(mean, "mean"), persistent=False)
        self.register_buffer("std", _channel_tensor(std, "std"), persistent=False)
        act = ACTIVATIONS[activation]
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(n, widths[0], widths[1], 1, act, bn_momentum),
            _BlockGroup(n, widths[1], widths[2], 2, act, bn_momentum),
            _BlockGroup(n, widths[2], widths[3], 2, act, bn_momentum),
        )
        self.batchnorm = nn.BatchNorm2d(widths[3], momentum=bn_momentum)
        self.relu = act()
        self.logits = nn.Linear(widths[3], num_classes)
        self.num_channels = widths[3]
        trades_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.init_conv((x - self.mean) / self.std)
        out = self.relu(self.batchnorm(self.layer(out)))
        return self.logits(global_avg_pool(out))


def _channel_tensor(values: Sequence[float], what: str) -> torch.Tensor:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{what} must have 3 values (one per RGB channel), got {values}")
    if what == "std" and min(values) <= 0:
        raise ValueError(f"std must be positive, got {values}")
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)


def _register_size(name: str, depth: int, width: int) -> None:
    def build(num_classes: int = 10, **kwargs) -> DMWideResNet:
        return DMWideResNet(num_classes, depth, width, **kwargs)

    build.__doc__ = f"WRN-{depth}-{width} SiLU (RobustBench `DMWideResNet` keys); options: mean, std, activation."
    register(name)(build)


for _name, (_depth, _width) in DM_SIZES.items():
    _register_size(_name, _depth, _width)
