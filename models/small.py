"""A small, fast CNN with BatchNorm for the CPU quickstart and the tests."""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register


class SmallCNN(nn.Module):
    """Four conv blocks (BN + ReLU), global pooling and a linear head; ~0.1M parameters at width 32."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        self.features = nn.Sequential(
            block(3, w // 2, 2),  # 16x16: digits and CIFAR stay recognisable, 4x cheaper
            block(w // 2, w, 1),
            block(w, 2 * w, 2),  # 8x8
            block(2 * w, 2 * w, 2),  # 4x4
        )
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


@register("small-cnn")
def small_cnn(num_classes: int = 10, width: int = 32, **_: object) -> nn.Module:
    return SmallCNN(num_classes, width)


@register("tiny-cnn")
def tiny_cnn(num_classes: int = 10, **_: object) -> nn.Module:
    """SmallCNN at width 16 (~25k parameters): the CPU quickstart's net, cheap enough for AutoAttack."""
    return SmallCNN(num_classes, width=16)
