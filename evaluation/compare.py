"""Side-by-side table of several evaluated runs: ``python -m evaluation.compare RUN [RUN ...]``.

Reads each ``RUN/eval/report.json`` written by eval_autoattack.py and prints one Markdown row per
run: clean accuracy and the robust accuracy of every (attack, eps) it holds, for every norm of the
report (titles ``AA 8/255`` for L-inf, ``AA L2 0.5``, ``AA L1 12``), and the common-corruptions mean.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from errors import UserError

from .report import EvalReport, read_report, report_path


def load_report(run: str | Path) -> EvalReport:
    """The report of ``RUN`` (``RUN/eval/report.json``) or of a ``report.json`` path."""
    return read_report(report_path(run), missing_hint=f"run eval_autoattack.py {run} first")


def comparison_table(runs: Sequence[str]) -> str:
    """Markdown table: a row per run, columns clean and '<attack> <eps>' in report order."""
    reports = [load_report(r) for r in runs]
    figures = [_figures(rep) for rep in reports]
    columns = list(dict.fromkeys(title for fig in figures for title in fig))
    header = "| run | clean | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for run, rep, by_key in zip(runs, reports, figures):
        cells = [f"{100 * by_key[c]:.2f}" if c in by_key else "" for c in columns]
        lines.append(f"| {run} | {100 * rep.clean_accuracy:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _figures(rep: EvalReport) -> dict[str, float]:
    """Column title -> accuracy in [0, 1] for every threat model of one report, in report order."""
    out = {}
    for part in [rep, *rep.sections.values()]:
        prefix = "" if part.norm in (None, "Linf") else f"{part.norm} "
        out.update({f"{r.label} {prefix}{r.eps_str}": r.robust_accuracy for r in part.rows})
    if rep.corruptions is not None:
        out["corruptions mean"] = rep.corruptions.mean_accuracy
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m evaluation.compare RUN [RUN ...]", file=sys.stderr)
        return 2
    try:
        print(comparison_table(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
