"""A further threat model in the same report: ``eval_autoattack.py --norm Linf L2 L1`` writes one report.

The first norm is the report's main part (the top-level fields of report.json and the unsuffixed
files, exactly as a one-norm evaluation writes them); each further norm is a :class:`NormSection`:
``sections[<norm>]`` of report.json (the same fields as the top level), a Markdown section with
both tables, its per-class accuracy and its own sanity checks, and the files suffixed with the norm
(``table_eps_L2.csv``, ``table_attacks_L2.csv``, ``per_sample_L2.csv``, ``per_class_L2.csv``,
``robust_vs_eps_L2.png``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from core.files import atomic_write
from core.threat import eps_text

from .report import (
    REPORT_FILES,
    _markdown_table,
    per_sample_frame,
    plot_robustness,
    report_dict,
    rule_lines,
    table_attacks,
    table_eps,
)
from .composite import composite_markdown
from .results import SuiteResult
from .stats import per_class, per_class_frame, per_class_markdown

_TABLES = {"table_eps": table_eps, "table_attacks": table_attacks, "per_sample": per_sample_frame,
           "per_class": lambda result: per_class_frame(per_class(result))}


class NormSection:
    """One more norm's suite result as a part of a report (see ``evaluation.report.write_reports``)."""

    def __init__(self, result: SuiteResult) -> None:
        self.result = result
        self.key = result.settings.norm

    def to_dict(self) -> dict[str, Any]:
        data = report_dict(self.result)
        data.pop("created", None)
        return data

    def markdown(self) -> str:
        r, s = self.result, self.result.settings
        lines = [f"## {s.norm} threat model", "",
                 f"- eps {', '.join(eps_text(e, s.norm) for e in s.eps)}; seed {s.seed}; fp32",
                 *[f"- {line}" for line in rule_lines(s)], "",
                 f"### {s.norm}: robust accuracy (%) across eps (Table 14 layout)", "",
                 _markdown_table(table_eps(r, ci=True)), "",
                 f"### {s.norm}: robust accuracy (%) per attack (Table 15 layout)", "",
                 _markdown_table(table_attacks(r, ci=True)), ""]
        lines += composite_markdown(r, heading=f"### {s.norm}: AutoAttack and MALT")
        lines += per_class_markdown(per_class(r), heading=f"### {s.norm}: per class")
        lines += [f"### {s.norm}: sanity checks", ""]
        lines += [f"- WARNING: {w}" for w in r.warnings] or ["- all passed"]
        return "\n".join(lines + [""])

    def write_files(self, out: Path) -> dict[str, Path]:
        paths = {}
        for kind, make in _TABLES.items():
            paths[f"{kind}_{self.key}"] = path = out / _suffixed(REPORT_FILES[kind], self.key)
            atomic_write(path, lambda f, make=make: make(self.result).to_csv(f), binary=False)
        paths[f"plot_{self.key}"] = out / _suffixed(REPORT_FILES["plot"], self.key)
        plot_robustness(self.result, paths[f"plot_{self.key}"])
        return paths


def _suffixed(name: str, key: str) -> str:
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}_{key}{dot}{suffix}"
