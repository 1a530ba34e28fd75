"""Side-by-side table of several evaluated runs: ``python -m evaluation.compare RUN [RUN ...]``.

Reads each ``RUN/eval/report.json`` written by eval_autoattack.py and prints one Markdown row per
run: clean accuracy and the robust accuracy of every (attack, eps) it holds.
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
    columns: list[tuple[str, str]] = []
    for rep in reports:
        for r in rep.rows:
            key = (r.label, r.eps_str)
            if key not in columns:
                columns.append(key)
    header = "| run | clean | " + " | ".join(f"{a} {e}" for a, e in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for run, rep in zip(runs, reports):
        by_key = {(r.label, r.eps_str): r.robust_accuracy for r in rep.rows}
        cells = [f"{100 * by_key[c]:.2f}" if c in by_key else "" for c in columns]
        lines.append(f"| {run} | {100 * rep.clean_accuracy:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
