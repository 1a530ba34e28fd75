"""Architectures. Importing this package registers every model in ``MODELS``."""
from .registry import MODELS, build_model, register
from . import dm_wide_resnet, preact_resnet, small, wide_resnet  # noqa: F401  (register their models)

__all__ = ["MODELS", "build_model", "register"]
