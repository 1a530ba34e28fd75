"""AutoAttack beside MALT in one report: each one's robust points, the worst case, and who broke what.

With ``--attacks aa malt`` the tables already show both and a worst case over every attack run;
this part of report.json / report.md names, per eps, the points one attack broke that the other
left robust, so a reader sees whether MALT found points AutoAttack missed (and the reverse).
"""
from __future__ import annotations

from typing import Any

from core.threat import eps_text

from .results import SuiteResult


def pairs(result: SuiteResult) -> list[tuple[str, str]]:
    """(AutoAttack name, MALT name) for every white-box AutoAttack and every MALT variant that ran."""
    specs = result.settings.attacks
    autoattacks = [a.name for a in specs if a.kind == "aa" and a.white_box]
    malts = [a.name for a in specs if a.kind == "malt"]
    return [(aa, m) for aa in autoattacks for m in malts]


def composite_rows(result: SuiteResult) -> list[dict[str, Any]]:
    """Per eps and pair: robust counts of each, of both together, and the points only one of them broke."""
    rows = []
    for eps in result.settings.eps:
        for aa, m in pairs(result):
            aa_flags, m_flags = result.robust(eps, aa), result.robust(eps, m)
            both = aa_flags & m_flags
            rows.append({"eps": eps, "eps_str": eps_text(eps, result.settings.norm), "autoattack": aa, "malt": m,
                         "n": result.n, "autoattack_robust": int(aa_flags.sum()), "malt_robust": int(m_flags.sum()),
                         "worst_robust": int(both.sum()), "worst_accuracy": both.float().mean().item(),
                         "only_malt_broke": int((aa_flags & ~m_flags).sum()),
                         "only_autoattack_broke": int((m_flags & ~aa_flags).sum())})
    return rows


def composite_markdown(result: SuiteResult, heading: str = "## AutoAttack and MALT") -> list[str]:
    """The report.md section (no lines when AutoAttack and MALT did not both run)."""
    rows = composite_rows(result)
    if not rows:
        return []
    labels = {a.name: a.label for a in result.settings.attacks}
    lines = [f"{heading}: worst case and who found the extra points", "",
             "| eps | AutoAttack | MALT | AutoAttack robust (%) | MALT robust (%) | both (%) | broken only by MALT | "
             "broken only by AutoAttack |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = max(r["n"], 1)
        lines.append(f"| {r['eps_str']} | {labels[r['autoattack']]} | {labels[r['malt']]} | "
                     f"{100 * r['autoattack_robust'] / n:.2f} | {100 * r['malt_robust'] / n:.2f} | "
                     f"{100 * r['worst_robust'] / n:.2f} | {r['only_malt_broke']} | {r['only_autoattack_broke']} |")
    lines += ["", "A point counts as robust in \"both\" only if neither attack broke it. A RobustBench claim still "
              "needs AutoAttack standard; MALT's extra points go in model_info as an external evaluation.", ""]
    return lines
