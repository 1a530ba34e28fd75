"""Name -> constructor registry for every architecture; argparse choices come from ``MODELS``.

Beside the names, ``--arch`` takes ``MODULE:CALLABLE`` (:mod:`models.factory`): any function or
class that returns a ``torch.nn.Module``. :func:`build_model` builds both kinds.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from core.registry import Registry
from errors import UserError

from .factory import ArchChoices, arch_kwargs_text, build_factory_model, canonical_factory, is_factory, load_factory

MODELS: Registry[Callable[..., nn.Module]] = Registry("model name")
ARCHS = ArchChoices(MODELS)  # what --arch accepts: the registry's names and MODULE:CALLABLE


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a constructor ``fn(num_classes, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        return MODELS.add(name, fn)

    return wrap


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered architecture or a ``MODULE:CALLABLE`` factory with ``kwargs``.

    An unknown registry name raises ``KeyError`` listing the choices; a factory's failures and
    options a registry constructor does not take are ``UserError`` lines.
    """
    if is_factory(name):
        return build_factory_model(name, num_classes, kwargs)
    if name not in MODELS:
        raise KeyError(f"unknown architecture {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](num_classes=num_classes, **kwargs)
    except TypeError as e:
        if not kwargs:
            raise
        raise UserError(f"--arch {name} does not take --arch-kwargs {arch_kwargs_text(kwargs)}: {e}") from None


def check_arch(arch: str, arch_kwargs: Any = None) -> tuple[str, str]:
    """``(arch, arch_kwargs)`` as a run records them, after checking that they can be used.

    A registry name must exist; a factory's module must import and hold the callable (it is not
    called here); ``arch_kwargs`` must be a JSON object. Errors are ``UserError`` lines.
    """
    text = arch_kwargs_text(arch_kwargs)
    if is_factory(arch):
        load_factory(arch)
        return canonical_factory(arch), text
    if arch not in MODELS:
        raise UserError(f"--arch {arch!r} is not one of: {', '.join(ARCHS)}")
    return arch, text
