"""A method's own hyperparameters, declared once in its registry entry (:class:`Param`).

A method with ``prefix`` ``gkl`` that declares ``Param("ce_weight", 5.0, ...)`` gets the config key
``gkl_ce_weight`` and the flag ``--gkl-ce-weight``; its loss reads ``spec.params["ce_weight"]``.
The config, its flags, their help, the range checks and ``--print-config`` all come from here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from errors import UserError

Value = Union[float, int, bool, str]


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its short name, default (whose type is the parameter's type), allowed range,
    one line of help (say what it weighs and the paper's name for it) and the old keys it was known by."""

    name: str
    default: Value
    help: str
    low: Optional[float] = None  # smallest allowed value (numbers; inclusive)
    high: Optional[float] = None  # largest allowed value (numbers; inclusive)
    old_keys: tuple[str, ...] = ()  # earlier config keys / flags of this parameter: they keep loading

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or not isinstance(self.default, (float, int, bool, str)):
            raise ValueError(f"parameter {self.name!r}: a Python name with a float, int, bool or str default")
        if isinstance(self.default, bool) and (self.low is not None or self.high is not None):
            raise ValueError(f"parameter {self.name!r}: a bool takes no range")

    @property
    def type(self) -> type:
        return type(self.default)

    def range_text(self) -> str:
        """``in [0, 1]``, ``>= 0``, ``<= 2`` or the empty string."""
        if self.low is not None and self.high is not None:
            return f"in [{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f">= {self.low:g}"
        return f"<= {self.high:g}" if self.high is not None else ""

    def check(self, flag: str, value: Any) -> None:
        """``UserError`` naming ``flag`` (and the old names) unless ``value`` is finite and in range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        was = f" (was {', '.join('--' + k.replace('_', '-') for k in self.old_keys)})" if self.old_keys else ""
        if not math.isfinite(value):
            raise UserError(f"{flag}{was} must be a finite number, got {value}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise UserError(f"{flag}{was} must be {self.range_text()}, got {value}")
