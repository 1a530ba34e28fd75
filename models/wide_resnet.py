"""Pre-activation WideResNet-d-w with RobustBench's ``wide_resnet.WideResNet`` key layout.

The parameter and buffer names, the forward pass and the initialisation equal RobustBench's
``WideResNet(depth, num_classes, widen_factor, sub_block1=False)`` (the TRADES / AWP network), so
a state_dict trained here loads with ``strict=True`` into RobustBench's class and back.
Inputs are images in [0, 1]; there is no normalisation inside (as in those checkpoints).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register

# name -> (depth, widen factor)
WRN_SIZES = {
    "wrn-34-10": (34, 10),
    "wrn-28-10": (28, 10),
    "wrn-34-20": (34, 20),
    "wrn-16-4": (16, 4),
    "wrn-10-1": (10, 1),
}


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice plus a shortcut.

    When the width changes, the input is activated once and both the residual branch and the
    1x1 projection read that activation; otherwise the shortcut is the raw input.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        needs_projection = in_planes != out_planes or stride != 1
        self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """``n`` blocks; only the first one changes width and stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs in [0, 1] (keys: conv1, block1-3, bn1, fc)."""

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 28, 34, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.nChannels = widths[3]
        trades_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(global_avg_pool(out))


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """N x C feature means. ``avg_pool2d`` over the whole map is, for 32x32 inputs, the very
    operation RobustBench runs (``avg_pool2d(out, 8)``), so logits agree bit for bit; a mean or
    adaptive pooling sums in another order."""
    return torch.flatten(F.avg_pool2d(x, kernel_size=x.shape[-2:]), 1)


def trades_init(model: nn.Module) -> None:
    """He-normal convs (fan-out), unit BN, zero linear bias: the TRADES WideResNet initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _register_size(name: str, depth: int, width: int) -> None:
    def build(num_classes: int = 10, **kwargs) -> WideResNet:
        return WideResNet(depth, width, num_classes, **kwargs)

    build.__doc__ = f"WRN-{depth}-{width} (RobustBench `WideResNet` keys); options: drop_rate."
    register(name)(build)


for _name, (_depth, _width) in WRN_SIZES.items():
    _register_size(_name, _depth, _width)
