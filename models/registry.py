"""Name -> constructor registry for every architecture; argparse choices come from ``MODELS``."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from core.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model name")


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a constructor ``fn(num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        return MODELS.add(name, fn)

    return wrap


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered architecture; unknown names raise ``KeyError`` listing the choices."""
    if name not in MODELS:
        raise KeyError(f"unknown architecture {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, **kwargs)
