"""``model_info``: RobustBench's JSON record of a model, filled from measured figures and a model card.

Percentages are strings with two decimals, eps reads ``"8/255"`` or ``"0.5"``, fields come in
RobustBench's order (``model_info/<dataset>/<threat>/<name>.json``). The corruptions board's files
have ``corruptions_acc`` instead of ``autoattack_acc``, ``eps`` null and no ``unreliable`` (as in
RobustBench's ``model_info/cifar10/corruptions/*.json``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from core.threat import eps_text
from errors import UserError

from .boards import (  # noqa: F401  (Figures and figures_from_report: this module's API before boards.py)
    CORRUPTIONS_BOARD,
    CorruptionFigures,
    Figures,
    figures_from_report,
)

if TYPE_CHECKING:
    from evaluation.report import EvalReport

# model_info fields in RobustBench's order, with the JSON type of each ("pct": "73.85"-style string).
MODEL_INFO_FIELDS: dict[str, str] = {
    "link": "str", "name": "str", "authors": "str", "additional_data": "bool",
    "number_forward_passes": "int", "dataset": "str", "venue": "str", "architecture": "str",
    "eps": "str", "clean_acc": "pct", "reported": "pct", "autoattack_acc": "pct", "external": "pct?",
    "footnote": "str?", "unreliable": "bool",
    "autoattack_implementation": "str?",  # not RobustBench's: which AutoAttack measured autoattack_acc
}
CORRUPTIONS_INFO_FIELDS: dict[str, str] = {
    "link": "str", "name": "str", "authors": "str", "additional_data": "bool",
    "number_forward_passes": "int", "dataset": "str", "venue": "str", "architecture": "str",
    "eps": "null", "clean_acc": "pct", "reported": "pct", "corruptions_acc": "pct", "footnote": "str?",
}


def board_fields(board: str) -> dict[str, str]:
    """The model_info fields of ``board`` (``Linf``, ``L2`` or ``corruptions``)."""
    return CORRUPTIONS_INFO_FIELDS if board == CORRUPTIONS_BOARD else MODEL_INFO_FIELDS


def pct(fraction: float) -> str:
    """A fraction as model_info's percentage string with two decimals (``0.3918 -> "39.18"``)."""
    return f"{100.0 * fraction:.2f}"


def check_report_model(report: "EvalReport", info: Mapping[str, Any]) -> None:
    """Refuse a report that evaluated other weights than the ones being exported."""
    evaluated = report.model
    keys = ["arch", "weights", "epoch", "global_step"]
    differ = [f"{k} {evaluated.get(k)!r} there vs {info.get(k)!r} here"
              for k in keys if evaluated.get(k) != info.get(k)]
    if info.get("kind") == "state_dict" and Path(str(evaluated.get("path"))).name != Path(str(info.get("path"))).name:
        differ.append(f"file {evaluated.get('path')} there vs {info.get('path')} here")
    if differ:
        raise UserError(f"{report.path} evaluated other weights than this export takes ({'; '.join(differ)}): run "
                        "eval_autoattack.py with the same --weights/--checkpoint, or pass --eval-json of that run")



@dataclass
class ModelCard:
    """The model_info fields only a human knows (paper, authors, venue...)."""

    link: str = ""
    name: str = ""
    authors: str = ""
    venue: str = ""
    additional_data: bool = False
    number_forward_passes: int = 1
    reported: Optional[float] = None  # robust accuracy in % as the paper reports it
    footnote: Optional[str] = None

    def missing(self) -> list[str]:
        """Human fields still empty."""
        return [k for k in ("link", "name", "authors", "venue") if not getattr(self, k).strip()]


def build_model_info(card: ModelCard, *, dataset: str, architecture: str, eps: float, norm: str,
                     figures: Optional[Figures]) -> dict[str, Any]:
    """model_info in RobustBench's field order and types; figures ``None`` leaves accuracies null."""
    reported = f"{card.reported:.2f}" if card.reported is not None else (
        pct(figures.autoattack) if figures else None)
    info: dict[str, Any] = {
        "link": card.link, "name": card.name, "authors": card.authors,
        "additional_data": bool(card.additional_data), "number_forward_passes": int(card.number_forward_passes),
        "dataset": dataset, "venue": card.venue, "architecture": architecture, "eps": eps_text(eps, norm),
        "clean_acc": pct(figures.clean) if figures else None, "reported": reported,
        "autoattack_acc": pct(figures.autoattack) if figures else None}
    external = figures.external if figures else None
    if external is not None:
        info["external"] = pct(external.accuracy)
    footnote = " ".join(t for t in (card.footnote, external.footnote() if external else None) if t)
    if footnote:
        info["footnote"] = footnote
    info["unreliable"] = False
    return info


def build_corruptions_info(card: ModelCard, *, dataset: str, architecture: str,
                           figures: Optional[CorruptionFigures]) -> dict[str, Any]:
    """The corruptions board's model_info (``corruptions_acc``: the mean over 15 x 5 pairs)."""
    measured = pct(figures.corruptions) if figures else None
    info: dict[str, Any] = {
        "link": card.link, "name": card.name, "authors": card.authors,
        "additional_data": bool(card.additional_data), "number_forward_passes": int(card.number_forward_passes),
        "dataset": dataset, "venue": card.venue, "architecture": architecture, "eps": None,
        "clean_acc": pct(figures.clean) if figures else None,
        "reported": f"{card.reported:.2f}" if card.reported is not None else measured, "corruptions_acc": measured}
    if card.footnote:
        info["footnote"] = card.footnote
    return info


def validate_model_info(info: Mapping[str, Any], *, evaluated: bool = True, board: str = "Linf") -> list[str]:
    """Problems of a model_info dict against RobustBench's fields and types for ``board`` (empty when valid)."""
    fields = board_fields(board)
    problems = [f"unknown field {k!r}" for k in info if k not in fields]
    for key, kind in fields.items():
        if key not in info:
            if not kind.endswith("?"):
                problems.append(f"missing field {key!r}")
            continue
        value = info[key]
        if kind in ("pct", "pct?"):
            if value is None and not evaluated:
                continue
            if not isinstance(value, str) or not _is_percentage(value):
                problems.append(f"{key} must be a percentage string like '39.18', got {value!r}")
        elif kind in ("str", "str?") and not isinstance(value, str):
            problems.append(f"{key} must be a string, got {value!r}")
        elif kind == "null" and value is not None:
            problems.append(f"{key} must be null on the {board} board, got {value!r}")
        elif kind == "bool" and not isinstance(value, bool):
            problems.append(f"{key} must be true or false, got {value!r}")
        elif kind == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{key} must be a positive integer, got {value!r}")
    if isinstance(info.get("eps"), str) and not _is_eps(info["eps"]):
        problems.append(f"eps must read like '8/255' or '0.5', got {info['eps']!r}")
    return problems


def _is_percentage(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and 0.0 <= value <= 100.0


def _is_eps(text: str) -> bool:
    num, _, den = text.partition("/")
    try:
        value = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return False
    return value > 0
