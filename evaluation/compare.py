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

``python -m evaluation.compare SWEEP [--baseline KEY=V,...]`` with one sweep folder (``submit.py
sweep``'s ``--out``, or any folder of run folders) aggregates the whole sweep instead: mean and
standard deviation over seeds per grid point, pooled intervals, paired tests against the baseline,
written to ``SWEEP/summary.{csv,md,json,png}`` (:mod:`evaluation.sweep_summary`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from errors import UserError

from .pairing import check_same_points, flags_of, points_of  # noqa: F401  (points_of: this module's API)
from .report import EvalReport, read_report, report_path
from .sweep import is_sweep_folder
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


def paired_rows(a: EvalReport, b: EvalReport) -> list[tuple[str, str, PairedTable]]:
    """(eps, attack label, table) for clean and every (norm, eps, attack) both reports hold, in A's order.

    Each norm is paired with the same norm of B (its section or its main part): the main norms
    of the two reports may differ. The eps of a norm other than L-inf is written ``L2 0.5``.
    """
    clean_a, clean_b = a.raw["per_sample"]["clean"], b.raw["per_sample"]["clean"]
    rows = [("-", "Clean", PairedTable.from_flags(flags_of(clean_a), flags_of(clean_b)))]
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
                table = PairedTable.from_flags(flags_of(bits_a), flags_of(bits_b))
                rows.append((prefix + r.eps_str, r.label, table))
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
        raise UserError(f"{message} (usage: python -m evaluation.compare RUN [RUN ...] [--unpaired], or "
                        "python -m evaluation.compare SWEEP [--baseline KEY=V,...])")


def main(argv: Optional[list[str]] = None) -> int:
    p = _Parser(prog="python -m evaluation.compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (RUN/eval/report.json) or report.json files; or one "
                   "sweep folder")
    p.add_argument("--unpaired", action="store_true", help="the side-by-side table only, no paired statistics")
    p.add_argument("--baseline", metavar="KEY=V,...", help="sweep: the grid point every other point is paired with")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
        text = _sweep(args) if len(args.runs) == 1 and is_sweep_folder(args.runs[0]) else None
        if text is None:
            if args.baseline:
                raise UserError(f"--baseline chooses a grid point of a sweep: {' '.join(args.runs)} is not one "
                                "sweep folder (sweep.yaml, or run folders below it)")
            text = compare(args.runs, unpaired=args.unpaired)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


def _sweep(args: argparse.Namespace) -> str:
    """The sweep summary's Markdown (its notes last), then the files written."""
    from .sweep_summary import summarize

    if args.unpaired:
        raise UserError("--unpaired is for RUN_A RUN_B: a sweep is paired only with --baseline")
    text, paths, _ = summarize(args.runs[0], baseline=args.baseline)
    return text + "\nwritten: " + ", ".join(str(p) for p in paths.values())


if __name__ == "__main__":
    sys.exit(main())
