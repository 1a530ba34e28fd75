"""Threat-model notation: the norms this project attacks in and how radii are read and written.

Radii are in [0, 1] pixel units. The field writes them per norm: L-inf as ``8/255``, L2 and L1
as plain numbers (``0.5``, ``12``), which is also how RobustBench's ``model_info`` files and
AutoAttack's papers write them. :func:`parse_eps` and :func:`eps_text` follow that notation.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from errors import UserError

NORMS = ("Linf", "L2", "L1")
# RobustBench's CIFAR radii for its L-inf and L2 boards; 12 is the L1 radius of APGD-L1 (Croce & Hein, 2021).
STANDARD_EPS = {"Linf": 8 / 255, "L2": 0.5, "L1": 12.0}
IMAGE_DIM = 3 * 32 * 32  # 32x32 RGB (CIFAR, digits, SVHN): the size radii are checked against unless told


def check_norm(norm: str, flag: str = "--norm") -> str:
    """``norm`` when it is one of :data:`NORMS`, else a ``UserError`` naming the choices."""
    if norm not in NORMS:
        raise UserError(f"{flag} {norm!r} is not one of: {', '.join(NORMS)}")
    return norm


def max_eps(norm: str, dim: int = IMAGE_DIM) -> float:
    """The ``norm`` diameter of the image cube [0, 1]^dim: a larger ball holds every image."""
    return {"Linf": 1.0, "L2": math.sqrt(dim), "L1": float(dim)}[check_norm(norm)]


def parse_eps(value: Any, norm: str = "Linf", dim: int = IMAGE_DIM) -> float:
    """Read a radius in ``norm``'s notation and return it in [0, 1] pixel units.

    L-inf: ``8``, ``8/255`` or ``0.0314`` (a bare number > 1 is x/255, the convention of the
    field's papers). L2 and L1: taken as written (``0.5``, ``12``; ``a/b`` is a fraction), and
    refused above the diameter of the [0, 1] image cube (``sqrt(3072)`` resp. ``3072`` for 32x32 RGB).
    """
    check_norm(norm)
    text = str(value).strip()
    example = {"Linf": "8, 8/255 or 0.0314", "L2": "0.5", "L1": "12"}[norm]
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            eps = float(num) / float(den)
        else:
            eps = float(text)
            if norm == "Linf" and eps > 1:
                eps = eps / 255.0
    except (ValueError, ZeroDivisionError):
        raise UserError(f"cannot read epsilon {value!r}: write an {norm} radius as {example}") from None
    if norm == "Linf":
        if not math.isfinite(eps) or eps < 0 or eps > 1:
            raise UserError(f"epsilon {value!r} is outside [0, 1] for images in [0, 1]: use e.g. 8/255")
        return eps
    limit = max_eps(norm, dim)
    if not math.isfinite(eps) or eps < 0 or eps > limit:
        raise UserError(f"{norm} epsilon {value!r} is outside [0, {limit:.4g}] (the {norm} diameter of [0, 1] "
                        f"images of {dim} values): {norm} radii are taken as written, e.g. {example}")
    return eps


def eps_str(eps: float) -> str:
    """Format a radius as ``x/255`` (as the paper's tables do); also the radius' form in seeds and keys."""
    return f"{eps * 255:g}/255"


def eps_text(eps: float, norm: str) -> str:
    """A radius as RobustBench writes it: ``"8/255"`` for Linf, ``"0.5"`` for L2, ``"12"`` for L1."""
    return eps_str(eps) if norm == "Linf" else f"{eps:g}"


def parse_radii(values: Optional[Sequence[str]], norms: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``--eps`` values per norm of ``norms``: ``RADIUS`` (one norm) or ``NORM:RADIUS`` (any number).

    Each radius is read in its norm's notation (:func:`parse_eps`); a norm given no radius gets
    :data:`STANDARD_EPS` (8/255, 0.5, 12). With several norms every radius names its norm.
    """
    for norm in norms:
        check_norm(norm)
    radii: dict[str, list[float]] = {norm: [] for norm in norms}
    for value in values or []:
        text = str(value).strip()
        prefix, sep, rest = text.partition(":")
        if sep:
            if prefix not in NORMS:
                raise UserError(f"--eps {text!r}: {prefix!r} is not one of: {', '.join(NORMS)}")
            if prefix not in radii:
                raise UserError(f"--eps {text!r} is an {prefix} radius but --norm is {' '.join(norms)}: add "
                                f"{prefix} to --norm")
            radii[prefix].append(parse_eps(rest, prefix))
        elif len(norms) > 1:
            raise UserError(f"--eps {text!r}: with several --norm write each radius as NORM:RADIUS, e.g. "
                            "--eps Linf:8/255 L2:0.5")
        else:
            radii[norms[0]].append(parse_eps(text, norms[0]))
    return {norm: tuple(r) if r else (STANDARD_EPS[norm],) for norm, r in radii.items()}
