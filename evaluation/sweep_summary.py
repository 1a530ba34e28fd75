"""One table for a whole sweep: ``python -m evaluation.compare SWEEP [--baseline KEY=V,...]``.

Per grid point and per accuracy of the evaluations (clean, and every norm x eps x attack including
the worst case), over the point's seeds: the mean and the sample standard deviation of the
per-seed accuracies, and the 95% Wilson interval of the pooled points (all seeds' flags counted
together). With ``--baseline`` every other point is paired with the baseline seed by seed on the
same test points (seed s of the point with seed s of the baseline; the pairs of all common seeds
pooled into one 2x2 table): the difference with Newcombe's paired interval, the points only one
side gets right, and the exact McNemar p-value (one test per row, not corrected for their number).
Written to ``SWEEP/summary.csv`` (one row per point and accuracy, fractions in [0, 1]),
``summary.md`` (percentages), ``summary.json`` and ``summary.png`` (robust accuracy against each
swept key). Statistics are :mod:`evaluation.stats`'s.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from core.files import atomic_write
from errors import UserError

from .pairing import points_of
from .stats import PairedTable, wilson
from .sweep import RunFlags, Sweep, load_sweep, parse_baseline, read_flags

SUMMARY_FORMAT = "gkl-at-sweep-summary/1"
SUMMARY_FILES = {"csv": "summary.csv", "markdown": "summary.md", "json": "summary.json", "plot": "summary.png"}


def by_point(sweep: Sweep, runs: list[RunFlags]) -> dict[tuple[str, ...], dict[int, RunFlags]]:
    """Grid point -> seed -> evaluated run, in grid order; two runs of one point with one seed are refused."""
    grouped: dict[tuple[str, ...], dict[int, RunFlags]] = {}
    for r in runs:
        point = tuple(r.run.point.get(k, "") for k in sweep.keys)
        seeds = grouped.setdefault(point, {})
        if r.run.seed in seeds:
            raise UserError(f"{seeds[r.run.seed].run.dir} and {r.run.dir} are the same grid point with the same seed "
                            f"{r.run.seed}: move one of them out of {sweep.root}")
        seeds[r.run.seed] = r
    return {p: dict(sorted(grouped[p].items())) for p in sweep.points() if p in grouped}


def summary_frame(sweep: Sweep, runs: list[RunFlags], baseline: Optional[tuple[str, ...]] = None) -> pd.DataFrame:
    """One row per grid point and accuracy (see the module's docstring); columns ``*keys, metric, ...``."""
    groups = by_point(sweep, runs)
    if baseline is not None and baseline not in groups:
        raise UserError(f"--baseline {','.join(f'{k}={v}' for k, v in zip(sweep.keys, baseline))} has no evaluated "
                        "run yet: evaluate it first or choose another baseline")
    rows = []
    for point, seeds in groups.items():
        metrics = list(dict.fromkeys(m for r in seeds.values() for m in r.flags))
        for metric in metrics:
            have = {s: r.flags[metric] for s, r in seeds.items() if metric in r.flags}
            about = next(r.about[metric] for r in seeds.values() if metric in r.about)
            row: dict[str, Any] = {"point": _point_text(sweep.keys, point) or "(all)", **dict(zip(sweep.keys, point))}
            row.update(metric=metric, **about, **_over_seeds(have))
            if baseline is not None and point != baseline:
                row.update(_paired(groups[baseline], have, metric))
            rows.append(row)
    return pd.DataFrame(rows)


def _over_seeds(flags: dict[int, torch.Tensor]) -> dict[str, Any]:
    per_seed = np.array([f.double().mean().item() for f in flags.values()])
    k, n = sum(int(f.sum()) for f in flags.values()), sum(f.numel() for f in flags.values())
    low, high = wilson(k, n)
    return {"seeds": len(flags), "seed_list": " ".join(map(str, flags)), "mean": per_seed.mean(),
            "std": per_seed.std(ddof=1) if len(per_seed) > 1 else float("nan"),
            "pooled_correct": k, "pooled_n": n, "ci_low": low, "ci_high": high}


def _paired(base: dict[int, RunFlags], flags: dict[int, torch.Tensor], metric: str) -> dict[str, Any]:
    """The point against the baseline: seed s with seed s on the same points, all common seeds pooled."""
    common = [s for s in flags if s in base and metric in base[s].flags]
    if not common:
        return {"paired_seeds": 0}
    table = PairedTable.from_flags(torch.cat([base[s].flags[metric] for s in common]),
                                   torch.cat([flags[s] for s in common]))
    low, high = table.difference_interval()
    return {"paired_seeds": len(common), "difference": table.difference, "difference_ci_low": low,
            "difference_ci_high": high, "only_baseline": table.only_a, "only_this": table.only_b,
            "mcnemar_p": table.mcnemar_p()}


# ------------------------------------------------------------------------------------- writing
def markdown(sweep: Sweep, frame: pd.DataFrame, baseline: Optional[tuple[str, ...]], notes: list[str],
             points: dict[str, Any]) -> str:
    """``summary.md``: mean ± std per point and accuracy, then the pooled intervals and paired tests."""
    keys = sweep.keys
    lines = [f"# Sweep summary: {sweep.root}", "",
             f"- {frame['point'].nunique()} grid point(s) evaluated, runs from {sweep.source}; swept: "
             f"{', '.join(keys) or 'nothing (seeds only)'}",
             f"- points: {points['dataset']} {points['split']}, n = {points['n']} per run, labels "
             f"{str(points['labels_sha256'])[:12]}",
             "- accuracy (%): mean ± sample standard deviation over the seeds; [low, high]: 95% Wilson interval "
             "of the pooled points of all seeds", ""]
    wide = []
    for point, part in frame.groupby("point", sort=False):
        row = {**{k: part[k].iloc[0] for k in keys}, "seeds": part["seed_list"].iloc[0]}
        row.update({m: _pm(mean, std) for m, mean, std in zip(part["metric"], part["mean"], part["std"])})
        wide.append(row)
    lines += ["## Mean ± std over seeds (%)", "", _md(pd.DataFrame(wide)), ""]
    focus = frame[frame["attack"].isin(["clean", "worst"])]
    cols = {**{k: focus[k] for k in keys}, "accuracy": focus["metric"],
            "pooled (%) [95% CI]": [f"{100 * k / n:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]" for k, n, lo, hi in
                                    zip(focus["pooled_correct"], focus["pooled_n"], focus["ci_low"], focus["ci_high"])]}
    if baseline is not None and "paired_seeds" in focus:
        cols.update(_paired_cells(focus))
        lines += [f"## Clean and worst case, pooled; paired against {_point_text(keys, baseline)}", "",
                  "Difference: this point minus the baseline, per-seed pairs on the same points pooled "
                  "(Newcombe's paired 95% interval); McNemar: exact two-sided p over the discordant points.", ""]
    else:
        lines += ["## Clean and worst case, pooled", "", "(pass --baseline KEY=V,... for paired tests)", ""]
    lines += [_md(pd.DataFrame(cols)), ""]
    return "\n".join(lines + [f"note: {n}" for n in notes] + [""])


def _paired_cells(focus: pd.DataFrame) -> dict[str, list[str]]:
    cells: dict[str, list[str]] = {"difference (% points) [95% CI]": [], "only baseline / only this": [],
                                   "McNemar p": []}
    for _, r in focus.iterrows():
        paired = not pd.isna(r.get("mcnemar_p", float("nan")))
        cells["difference (% points) [95% CI]"].append(
            f"{100 * r['difference']:+.2f} [{100 * r['difference_ci_low']:+.2f}, {100 * r['difference_ci_high']:+.2f}]"
            if paired else "baseline" if pd.isna(r.get("paired_seeds")) else "no common seed")
        counts = f"{int(r['only_baseline'])} / {int(r['only_this'])}" if paired else ""
        cells["only baseline / only this"].append(counts)
        cells["McNemar p"].append(f"{r['mcnemar_p']:.3g}" if paired else "")
    return cells


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.2f}" + ("" if np.isnan(std) else f" ± {100 * std:.2f}")


def _point_text(keys: list[str], point: tuple[str, ...]) -> str:
    return ",".join(f"{k}={v}" for k, v in zip(keys, point))


def _md(frame: pd.DataFrame) -> str:
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines)


def plot(sweep: Sweep, frame: pd.DataFrame, path: Path) -> bool:
    """``summary.png``: mean worst-case accuracy (± std) against each swept key, one panel per key and
    eps of the first norm, one line per value of the other keys. False (nothing written) without a swept key."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sweep.keys
    robust = frame[frame["attack"] == "worst"]
    if not keys or robust.empty:
        return False
    norm = robust["norm"].iloc[0]
    metrics = list(dict.fromkeys(robust.loc[robust["norm"] == norm, "metric"]))
    fig = Figure(figsize=(4.5 * len(keys), 3.4 * len(metrics)), dpi=110)
    FigureCanvasAgg(fig)
    for i, metric in enumerate(metrics):
        rows = robust[robust["metric"] == metric]
        for j, key in enumerate(keys):
            ax = fig.add_subplot(len(metrics), len(keys), i * len(keys) + j + 1)
            others = [k for k in keys if k != key]
            for label, part in (rows.groupby(others, sort=False) if others else [("", rows)]):
                part = part.set_index(key).reindex([v for v in sweep.grid[key] if v in set(part[key])])
                x = _positions(sweep.grid[key], list(part.index))
                text = _point_text(others, label if isinstance(label, tuple) else (label,)) if others else None
                ax.errorbar(x, 100 * part["mean"], yerr=100 * part["std"].fillna(0), marker="o", capsize=3,
                            label=text)
            ax.set(xlabel=key, ylabel=f"{metric} (%)", title=f"{metric} vs {key}")
            if not _numeric(sweep.grid[key]):
                ax.set_xticks(range(len(sweep.grid[key])), sweep.grid[key])
            ax.grid(alpha=0.3)
            if others:
                ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return True


def _numeric(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def _positions(grid_values: list[str], values: list[str]) -> list[float]:
    return [float(v) for v in values] if _numeric(grid_values) else [grid_values.index(v) for v in values]


def summarize(root: str | Path, baseline: Optional[str] = None) -> tuple[str, dict[str, Path], list[str]]:
    """Aggregate the sweep in ``root`` and write its summary files; returns the Markdown, the paths and the notes."""
    sweep = load_sweep(root)
    point = parse_baseline(baseline, sweep)
    runs, missing = read_flags(sweep)
    if not runs:
        raise UserError(f"none of the {len(sweep.runs)} runs of {sweep.root} has an evaluation yet "
                        f"({'; '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): evaluate them first")
    frame = summary_frame(sweep, runs, point)
    notes = [f"{len(missing)} of {len(sweep.runs)} runs not in the summary (not evaluated yet, or failed): "
             + "; ".join(missing)] if missing else []
    paths = {kind: sweep.root / name for kind, name in SUMMARY_FILES.items()}
    if not plot(sweep, frame, paths["plot"]):
        paths.pop("plot")
        notes.append("no summary.png: the sweep varies no key besides the seed, or no attack ran")
    points = points_of(runs[0].report)
    text = markdown(sweep, frame, point, notes, points)
    data = {"format": SUMMARY_FORMAT, "sweep": str(sweep.root), "source": sweep.source, "grid": sweep.grid,
            "baseline": None if point is None else dict(zip(sweep.keys, point)), "points": points,
            "runs": [{"dir": r.dir, "point": r.point, "seed": r.seed} for r in sweep.runs], "not_evaluated": missing,
            "rows": json.loads(frame.to_json(orient="records"))}
    atomic_write(paths["csv"], lambda f: frame.to_csv(f, index=False), binary=False)
    atomic_write(paths["markdown"], lambda f: f.write(text), binary=False)
    atomic_write(paths["json"], lambda f: json.dump(data, f, indent=1), binary=False)
    return text, paths, notes
