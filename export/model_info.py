"""``model_info``: RobustBench's JSON record of a model, filled from measured figures and a model card.

Percentages are strings with two decimals, eps reads ``"8/255"`` or ``"0.5"``, fields come in
RobustBench's order (``model_info/<dataset>/<threat>/<name>.json``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from core.threat import eps_text
from errors import UserError

if TYPE_CHECKING:
    from evaluation.report import EvalReport

# model_info fields in RobustBench's order, with the JSON type of each ("pct": "73.85"-style string).
MODEL_INFO_FIELDS: dict[str, str] = {
    "link": "str", "name": "str", "authors": "str", "additional_data": "bool",
    "number_forward_passes": "int", "dataset": "str", "venue": "str", "architecture": "str",
    "eps": "str", "clean_acc": "pct", "reported": "pct", "autoattack_acc": "pct",
    "footnote": "str?", "unreliable": "bool",
}


@dataclass(frozen=True)
class Figures:
    """Measured accuracies (fractions in [0, 1]) at one threat model, and where they come from."""

    clean: float
    autoattack: float
    n: int
    eps: float
    norm: str
    source: str


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


def figures_from_report(report: "EvalReport", *, dataset: str, norm: str, eps: float) -> Figures:
    """Clean and standard-AutoAttack accuracy at ``eps`` from an evaluation report."""
    path = report.path
    if report.norm != norm:
        raise UserError(f"{path} evaluated the {report.norm} threat model, not {norm}: pass "
                        f"--norm {report.norm} or evaluate with --norm {norm}")
    if report.dataset != dataset or (report.split or "test") != "test":
        raise UserError(f"{path} evaluated {report.dataset} {report.split}, but RobustBench figures are "
                        f"on the {dataset} test split: rerun eval_autoattack.py with --dataset {dataset} --split test")
    row = report.find("aa", eps)
    if row is None:
        have = ", ".join(eps_text(r.eps, norm) for r in report.rows if r.attack == "aa") or "none"
        text = eps_text(eps, norm)
        raise UserError(f"{path} has no standard AutoAttack (aa) result at eps {text} (aa at: {have}): "
                        f"run eval_autoattack.py SOURCE --eps {text} --attacks aa, or pass --eps")
    n = report.n if report.n is not None else (row.n or 0)
    return Figures(clean=report.clean_accuracy, autoattack=row.robust_accuracy, n=int(n), eps=eps, norm=norm,
                   source=str(path))


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
    if card.footnote:
        info["footnote"] = card.footnote
    info["unreliable"] = False
    return info


def validate_model_info(info: Mapping[str, Any], *, evaluated: bool = True) -> list[str]:
    """Problems of a model_info dict against RobustBench's fields and types (empty when valid)."""
    problems = [f"unknown field {k!r}" for k in info if k not in MODEL_INFO_FIELDS]
    for key, kind in MODEL_INFO_FIELDS.items():
        if key not in info:
            if not kind.endswith("?"):
                problems.append(f"missing field {key!r}")
            continue
        value = info[key]
        if kind == "pct":
            if value is None and not evaluated:
                continue
            if not isinstance(value, str) or not _is_percentage(value):
                problems.append(f"{key} must be a percentage string like '39.18', got {value!r}")
        elif kind in ("str", "str?") and not isinstance(value, str):
            problems.append(f"{key} must be a string, got {value!r}")
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
