"""Threat-model notation: the norms this project attacks in and how radii are read and written."""
from __future__ import annotations

import math
from typing import Any

from errors import UserError

NORMS = ("Linf", "L2")


def check_norm(norm: str, flag: str = "--norm") -> str:
    """``norm`` when it is one of :data:`NORMS`, else a ``UserError`` naming the choices."""
    if norm not in NORMS:
        raise UserError(f"{flag} {norm!r} is not one of: {', '.join(NORMS)}")
    return norm


def parse_eps(value: Any) -> float:
    """Accept ``8``, ``8/255``, ``0.0314`` (or a float) and return the radius in [0, 1] units.

    A bare number > 1 is read as x/255, the convention of the field's papers.
    """
    text = str(value).strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            eps = float(num) / float(den)
        else:
            eps = float(text)
            if eps > 1:
                eps = eps / 255.0
    except (ValueError, ZeroDivisionError):
        raise UserError(f"cannot read epsilon {value!r}: write it as 8, 8/255 or 0.0314") from None
    if not math.isfinite(eps) or eps < 0 or eps > 1:
        raise UserError(f"epsilon {value!r} is outside [0, 1] for images in [0, 1]: use e.g. 8/255")
    return eps


def eps_str(eps: float) -> str:
    """Format a radius as ``x/255`` (as the paper's tables do)."""
    return f"{eps * 255:g}/255"


def eps_text(eps: float, norm: str) -> str:
    """A radius as RobustBench writes it: ``"8/255"`` for Linf, ``"0.5"`` for L2."""
    return eps_str(eps) if norm == "Linf" else f"{eps:g}"
