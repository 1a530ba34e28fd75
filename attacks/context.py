"""The attack context: evaluation mode and frozen parameters while adversarial examples are made."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.nn as nn


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False`` on every parameter; restore both on exit.

    Each submodule's train/eval flag and each parameter's ``requires_grad`` are restored exactly as
    found (a model may mix modes, e.g. frozen BatchNorm inside a training model), also on error.
    Nesting is safe. Pass the bare module, not a DistributedDataParallel wrapper: DDP expects every
    forward with gradients enabled to be followed by a parameter backward.
    """
    modes = [(module, module.training) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training
