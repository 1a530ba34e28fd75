"""RobustBench's CIFAR boards (threat models): which exist, their radii, zoo lists and figures.

A board is a key of ``robustbench.model_zoo.<dataset>`` (``ThreatModel``): ``Linf`` (8/255) and
``L2`` (0.5) rank standard AutoAttack accuracy, ``corruptions`` the mean accuracy over CIFAR-10-C /
CIFAR-100-C's 15 corruptions x 5 severities. CIFAR-100 has no L2 board. L1 results (this project
evaluates them) have no board.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

from core.threat import STANDARD_EPS as _NORM_EPS
from core.threat import eps_text
from data.corruptions import CORRUPTIONS, FOLDERS, SEVERITIES
from errors import UserError

from .external import External, external_from_report

if TYPE_CHECKING:
    from evaluation.report import EvalReport

CORRUPTIONS_BOARD = "corruptions"
THREAT_MODELS = ("Linf", "L2", CORRUPTIONS_BOARD)
BOARDS = {"cifar10": ("Linf", "L2", CORRUPTIONS_BOARD), "cifar100": ("Linf", CORRUPTIONS_BOARD)}
ZOO_LISTS = {"Linf": "linf", "L2": "l2", CORRUPTIONS_BOARD: "common_corruptions"}  # in model_zoo/<dataset>.py
STANDARD_EPS = {"Linf": _NORM_EPS["Linf"], "L2": _NORM_EPS["L2"]}


def boards_for(dataset: str) -> tuple[str, ...]:
    """RobustBench's boards for ``dataset``; for another dataset (no leaderboard) every kind, for reference."""
    return BOARDS.get(dataset, THREAT_MODELS)


@dataclass(frozen=True)
class Figures:
    """Measured accuracies (fractions in [0, 1]) at one L-inf / L2 threat model, and where they come from."""

    clean: float
    autoattack: float
    n: int
    eps: float
    norm: str
    source: str
    implementation: Optional[str] = None  # the AutoAttack that measured ``autoattack`` (package, version, source)
    external: Optional[External] = None  # worst case over AutoAttack and MALT, when below AutoAttack


@dataclass(frozen=True)
class CorruptionFigures:
    """Clean accuracy and the mean accuracy over the 15 x 5 corruption pairs (``n`` images per pair)."""

    clean: float
    corruptions: float
    n: int
    source: str


BoardFigures = Union[Figures, CorruptionFigures]


def figures_from_report(report: "EvalReport", *, dataset: str, norm: str, eps: float) -> Figures:
    """Clean and standard-AutoAttack accuracy at ``eps`` from the ``norm`` part of an evaluation report."""
    path = report.path
    _check_data(report, dataset)
    part = report.threat(norm)
    if part is None:
        raise UserError(f"{path} evaluated the {', '.join(report.norms) or 'no'} threat model(s), not {norm}: "
                        f"evaluate with --norm {norm} (several norms may go in one report: --norm Linf L2)")
    row = part.find("aa", eps)
    if row is None:
        have = ", ".join(eps_text(r.eps, norm) for r in part.rows if r.attack == "aa") or "none"
        text = eps_text(eps, norm)
        raise UserError(f"{path} has no standard AutoAttack (aa) result at eps {text} (aa at: {have}): "
                        f"run eval_autoattack.py SOURCE --norm {norm} --eps {text} --attacks aa, or pass --eps")
    n = part.n if part.n is not None else (row.n or 0)
    return Figures(clean=part.clean_accuracy, autoattack=row.robust_accuracy, n=int(n), eps=eps, norm=norm,
                   source=str(path), implementation=_autoattack_summary(report.raw),
                   external=external_from_report(part, eps))


def _autoattack_summary(raw: dict) -> Optional[str]:
    """The report's ``environment.autoattack.summary`` (which AutoAttack ran); None in older reports."""
    found = raw.get("environment")
    for key in ("autoattack", "summary"):
        found = found.get(key) if isinstance(found, dict) else None
    return found if isinstance(found, str) else None


def corruption_figures_from_report(report: "EvalReport", *, dataset: str) -> CorruptionFigures:
    """Clean accuracy (test set) and the corruptions mean, refused unless all 15 x 5 pairs were evaluated."""
    path = report.path
    _check_data(report, dataset)
    part = report.corruptions
    if part is None:
        raise UserError(f"{path} has no common-corruptions results: run eval_autoattack.py SOURCE --attacks "
                        f"clean corruptions --data-dir DIR (with {FOLDERS.get(dataset, 'CIFAR-10-C')}/ in DIR)")
    if not all_corruptions(report):
        raise UserError(f"{path} evaluated {len(part.corruptions)} of {len(CORRUPTIONS)} corruptions at "
                        f"{len(part.severities)} of {len(SEVERITIES)} severities; RobustBench's figure averages all "
                        f"{len(CORRUPTIONS) * len(SEVERITIES)}: rerun --attacks corruptions without --corruptions "
                        "and --severities")
    return CorruptionFigures(clean=report.clean_accuracy, corruptions=part.mean_accuracy, n=part.n_per_severity,
                             source=str(path))


def all_corruptions(report: "EvalReport") -> bool:
    """Whether the report's corruptions section covers all 15 x 5 pairs (RobustBench's figure)."""
    part = report.corruptions
    return part is not None and set(part.accuracies) == {(c, s) for c in CORRUPTIONS for s in SEVERITIES}


def has_results(report: "EvalReport", board: str, eps: Optional[float]) -> bool:
    """Whether ``report`` holds what ``board``'s model_info needs (AutoAttack at ``eps``, or corruptions)."""
    if board == CORRUPTIONS_BOARD:
        return report.corruptions is not None
    part = report.threat(board)
    return part is not None and eps is not None and part.find("aa", eps) is not None


def _check_data(report: "EvalReport", dataset: str) -> None:
    if report.dataset != dataset or (report.split or "test") != "test":
        raise UserError(f"{report.path} evaluated {report.dataset} {report.split}, but RobustBench figures are "
                        f"on the {dataset} test split: rerun eval_autoattack.py with --dataset {dataset} --split test")
