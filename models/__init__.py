"""Architectures. Importing this package registers every model in ``MODELS``; ``--arch`` also takes
``MODULE:CALLABLE`` (:mod:`models.factory`)."""
from .factory import check_output, is_factory, parse_arch_kwargs
from .registry import ARCHS, MODELS, build_model, check_arch, register
from . import dm_wide_resnet, preact_resnet, small, wide_resnet  # noqa: F401  (register their models)

__all__ = ["ARCHS", "MODELS", "build_model", "check_arch", "check_output", "is_factory", "parse_arch_kwargs",
           "register"]
