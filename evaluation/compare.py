"""Side-by-side table of several evaluated runs, with paired statistics: ``python -m evaluation.compare A B [C ...]``.

Reads each ``RUN/eval/report.json`` written by eval_autoattack.py and prints one Markdown row per
run: clean accuracy and the robust accuracy of every (attack, eps) it holds, for every norm of the
report (titles ``AA 8/255`` for L-inf, ``AA L2 0.5``, ``AA L1 12``), and the common-corruptions mean.
Then each later run is paired with the first, point by point (the ``per_sample`` flags of each
norm both reports hold): per norm, eps and attack held by both, the difference in accuracy with its 95%
interval (Newcombe's hybrid score interval for paired proportions), the points only one of them
gets right, and the exact McNemar p-value (one test per row, not corrected for the number of
rows). Runs evaluated on different points (dataset, split, number of points, digests of labels
and images) are refused: their flags cannot be paired. ``--unpaired`` prints the side-by-side
table alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from errors import UserError

from .report import EvalReport, read_report, report_path
from .stats import PairedTable


def load_report(run: str | Path) -> EvalReport:
    """The report of ``RUN`` (``RUN/eval/report.json``) or of a ``report.json`` path."""
    return read_report(report_path(run), missing_hint=f"run eval_autoattack.py {run} first")


def comparison_table(runs: Sequence[str], reports: Optional[Sequence[EvalReport]] = None) -> str:
    """Markdown table: a row per run, columns clean and '<attack> <eps>' in report order."""
    reports = list(reports) if reports is not None else [load_report(r) for r in runs]
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


# ------------------------------------------------------------------------------------- pairing
def points_of(rep: EvalReport) -> dict[str, object]:
    """What identifies a report's points: dataset, split, n and the digests eval_autoattack.py records."""
    data = rep.raw.get("data") or {}
    points = data.get("points") or {}
    return {"dataset": rep.dataset, "split": rep.split, "n": rep.n,
            "labels_sha256": points.get("labels_sha256"), "images_sha256": points.get("images_sha256")}


def check_same_points(name_a: str, a: EvalReport, name_b: str, b: EvalReport) -> None:
    """``UserError`` unless both reports hold per-point flags over the same points."""
    for name, rep in ((name_a, a), (name_b, b)):
        if not isinstance(rep.raw.get("per_sample"), dict) or "clean" not in rep.raw["per_sample"]:
            raise UserError(f"cannot pair {name}: its report has no per-point flags (per_sample); rerun "
                            f"eval_autoattack.py on it with --resume (finished attacks are reused), or pass --unpaired")
    pa, pb = points_of(a), points_of(b)
    if pa["labels_sha256"] is None or pb["labels_sha256"] is None:
        missing = name_a if pa["labels_sha256"] is None else name_b
        raise UserError(f"cannot pair {name_a} and {name_b}: the report of {missing} does not identify its points "
                        "(written before point digests); rerun eval_autoattack.py on it with --resume, or pass "
                        "--unpaired")
    differ = [f"{k} {pa[k]} vs {pb[k]}" if k in ("dataset", "split", "n") else f"{k[:-7]} differ"
              for k in pa if pa[k] != pb[k]]
    if differ:
        raise UserError(f"cannot pair {name_a} and {name_b}: they were evaluated on different points "
                        f"({', '.join(differ)}); evaluate both on the same points (same --dataset, --split, "
                        "--n-ex, data) or pass --unpaired for the side-by-side table alone")


def _flags(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def paired_rows(a: EvalReport, b: EvalReport) -> list[tuple[str, str, PairedTable]]:
    """(eps, attack label, table) for clean and every (norm, eps, attack) both reports hold, in A's order.

    Each norm is paired with the same norm of B (its section or its main part): the main norms
    of the two reports may differ. The eps of a norm other than L-inf is written ``L2 0.5``.
    """
    clean_a, clean_b = a.raw["per_sample"]["clean"], b.raw["per_sample"]["clean"]
    rows = [("-", "Clean", PairedTable.from_flags(_flags(clean_a), _flags(clean_b)))]
    for norm in a.norms or [a.norm]:
        part_a, part_b = a.threat(norm), b.threat(norm)
        if part_a is None or part_b is None:
            continue
        sa, sb = part_a.raw.get("per_sample") or {}, part_b.raw.get("per_sample") or {}
        prefix = "" if norm in (None, "Linf") else f"{norm} "
        for r in part_a.rows:
            bits_a = (sa.get(r.eps_str) or {}).get(r.attack)
            bits_b = (sb.get(r.eps_str) or {}).get(r.attack)
            if bits_a is not None and bits_b is not None:
                rows.append((prefix + r.eps_str, r.label, PairedTable.from_flags(_flags(bits_a), _flags(bits_b))))
    return rows


def paired_table(name_a: str, a: EvalReport, name_b: str, b: EvalReport) -> str:
    """Markdown: B - A per (eps, attack) with the 95% interval, discordant points and McNemar's exact p."""
    check_same_points(name_a, a, name_b, b)
    p = points_of(a)
    lines = [f"Paired on the same {p['n']} points ({p['dataset']} {p['split']}, labels "
             f"{str(p['labels_sha256'])[:12]}): B = {name_b}, A = {name_a}", "",
             "| eps | attack | A (%) | B (%) | B - A (% points) | 95% interval | only A | only B | McNemar p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for eps, label, t in paired_rows(a, b):
        low, high = t.difference_interval()
        lines.append(f"| {eps} | {label} | {100 * t.accuracy_a:.2f} | {100 * t.accuracy_b:.2f} | "
                     f"{100 * t.difference:+.2f} | [{100 * low:+.2f}, {100 * high:+.2f}] | {t.only_a} | {t.only_b} | "
                     f"{t.mcnemar_p():.3g} |")
    return "\n".join(lines)


def compare(runs: Sequence[str], unpaired: bool = False) -> str:
    """The side-by-side table and, unless ``unpaired``, every later run paired with the first."""
    reports = [load_report(r) for r in runs]
    parts = [comparison_table(runs, reports)]
    if not unpaired:
        parts += [paired_table(runs[0], reports[0], run, rep) for run, rep in zip(runs[1:], reports[1:])]
    return "\n\n".join(parts)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (usage: python -m evaluation.compare RUN [RUN ...] [--unpaired])")


def main(argv: Optional[list[str]] = None) -> int:
    p = _Parser(prog="python -m evaluation.compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (RUN/eval/report.json) or report.json files")
    p.add_argument("--unpaired", action="store_true", help="the side-by-side table only, no paired statistics")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        text = compare(args.runs, unpaired=args.unpaired)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
