"""Which RobustBench boards an export writes, with which radius and which measured figures.

Every board's figures come from its own part of an evaluation report (the norm's section, or the
corruptions section); :func:`plan_boards` reads and checks them all before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from checkpoints.run import default_out_dir
from core.threat import eps_text
from errors import UserError

from .boards import (
    CORRUPTIONS_BOARD,
    STANDARD_EPS,
    BoardFigures,
    all_corruptions,
    boards_for,
    corruption_figures_from_report,
    figures_from_report,
    has_results,
)
from .model_info import check_report_model
from .request import ExportRequest

if TYPE_CHECKING:
    from evaluation.report import EvalReport


@dataclass
class BoardPlan:
    """One board to export: its radius (None for corruptions), measured figures, claim data."""

    board: str
    eps: Optional[float]
    evaluated: Optional[BoardFigures]
    claim_data: Optional[tuple[Path, int]] = None
    corruptions_root: Optional[Path] = None


def _board_eps(req: ExportRequest, config: Mapping[str, Any], board: str, primary: str) -> Optional[float]:
    """``--eps`` (for the first board), else the board's own radius (RobustBench's 8/255 and 0.5, which is also
    what eval_autoattack.py evaluates by default), whatever radius the run trained at."""
    if board == CORRUPTIONS_BOARD:
        return None
    if board == primary and req.eps is not None:
        return float(req.eps)
    return STANDARD_EPS[board]


def plan_boards(req: ExportRequest, info: Mapping[str, Any], config: Mapping[str, Any], dataset: str,
                notes: list[str]) -> list[BoardPlan]:
    """The boards to export, the requested (or the training norm's) first, each with its figures.

    With ``--norm`` that board only. Otherwise every board of the dataset that the reports have
    results for; when they have none, the training norm's board (whose missing figures are then
    an error unless ``--allow-unevaluated`` or ``--claim``). ``--eps`` makes the first board required.
    """
    reports = _reports(req, info)
    trained = config.get("norm") if config.get("norm") in STANDARD_EPS else "Linf"
    primary = req.norm or trained
    if req.norm:
        wanted = [req.norm]
        if req.norm not in boards_for(dataset):
            notes.append(f"RobustBench has no {dataset} {req.norm} board: that model_info is for reference only")
    else:
        # a quick look at a few corruptions is no board entry (unless --claim measures the board itself):
        # the other boards still export
        partial = [] if req.claim else [r for r in reports if r.corruptions is not None and not all_corruptions(r)]
        if partial:
            notes.append(f"{CORRUPTIONS_BOARD} not exported: {partial[0].path} evaluated a subset of the 15 x 5 "
                         "corruptions, RobustBench's figure averages all of them (rerun --attacks corruptions "
                         "without --corruptions/--severities)")
        available = [b for b in boards_for(dataset)
                     if any(has_results(r, b, _board_eps(req, config, b, primary))
                            and (b != CORRUPTIONS_BOARD or req.claim or all_corruptions(r)) for r in reports)]
        if req.eps is not None or not available:
            available = [primary] + [b for b in available if b != primary]
        wanted = sorted(available, key=lambda b: b != primary)
        skipped = [n for r in reports for n in r.norms if n not in boards_for(dataset)]
        if skipped:
            notes.append(f"no RobustBench {dataset} board for the {', '.join(dict.fromkeys(skipped))} results: "
                         "not exported")
        notes += _other_radii(req, config, reports, [b for b in boards_for(dataset) if b not in wanted], primary)
    return [BoardPlan(b, eps, _figures(req, reports, dataset, b, eps, notes)) for b in wanted
            for eps in [_board_eps(req, config, b, primary)]]


def _other_radii(req: ExportRequest, config: Mapping[str, Any], reports: list[EvalReport], boards: list[str],
                 primary: str) -> list[str]:
    """Notes for boards left out because the reports' AutoAttack ran at other radii than the board's."""
    notes = []
    for board in boards:
        eps = _board_eps(req, config, board, primary)
        have = sorted({r.eps for rep in reports for part in [rep.threat(board)] if part is not None
                       for r in part.rows if r.attack == "aa"})
        if eps is None or not have:
            continue
        texts = [eps_text(e, board) for e in have]
        fix = f"--eps {texts[0]}" if board == primary else f"--norm {board} --eps {texts[0]}"
        notes.append(f"{board} not exported: the evaluation's AutoAttack ran at {', '.join(texts)}, the export "
                     f"looks for {eps_text(eps, board)}; pass {fix} to export that figure")
    return notes


def _reports(req: ExportRequest, info: Mapping[str, Any]) -> list[EvalReport]:
    """The evaluation reports (``--eval-json``, else RUN/eval/report.json when present), checked."""
    from evaluation.report import read_report

    given = [req.eval_json] if isinstance(req.eval_json, str) else list(req.eval_json or [])
    paths = [Path(p) for p in given] or [default_out_dir(req.source, "eval") / "report.json"]
    reports = []
    for path in paths:
        if not path.is_file():
            if given:
                raise UserError(f"--eval-json {path} does not exist: pass the report.json of eval_autoattack.py")
            continue
        report = read_report(path)
        check_report_model(report, info)
        reports.append(report)
    return reports


def _figures(req: ExportRequest, reports: list[EvalReport], dataset: str, board: str, eps: Optional[float],
             notes: list[str]) -> Optional[BoardFigures]:
    """The board's measured figures from the one report that has them; an error when none has them."""
    found = [r for r in reports if has_results(r, board, eps)]
    if len(found) > 1:
        raise UserError(f"{found[0].path} and {found[1].path} both have {board} results: pass the --eval-json "
                        "to take them from")
    if not found:
        if req.allow_unevaluated or req.claim:
            return None
        if not reports:
            path = default_out_dir(req.source, "eval") / "report.json"
            raise UserError(f"no evaluation found at {path}: run eval_autoattack.py {req.source} --attacks aa first "
                            "(or pass --eval-json REPORT, --claim, or --allow-unevaluated)")
        found = reports[:1]  # its reader names what is missing
    try:
        if board == CORRUPTIONS_BOARD:
            return corruption_figures_from_report(found[0], dataset=dataset)
        assert eps is not None
        return figures_from_report(found[0], dataset=dataset, norm=board, eps=eps)
    except UserError as e:
        if not req.claim:
            raise
        notes.append(f"the evaluation's {board} figures are not RobustBench's ({e}); model_info uses the claim")
        return None
