"""A sweep folder read back: its runs (grid point and seed of each) and their evaluations' per-point flags.

A sweep is a folder of run folders. With ``SWEEP/sweep.yaml`` (written by ``submit.py sweep``;
format ``gkl-at-sweep/1``) the runs, grid points and seeds are the manifest's; without it every
folder below ``SWEEP`` that holds a ``config.yaml`` is a run, its seed is its config's ``seed``
and its grid point is its values of the config keys that differ between the runs (keys that do
not change results, such as ``device`` or ``workers``, are left out). Each run's evaluation is
``RUN/eval/report.json`` (eval_autoattack.py's default ``--out``); runs without one are listed,
with the reason, rather than refused. :mod:`evaluation.sweep_summary` aggregates what is read here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from errors import UserError

from .pairing import check_same_points, flags_of
from .report import EvalReport, read_report

SWEEP_FORMAT = "gkl-at-sweep/1"
MANIFEST = "sweep.yaml"
# Config keys that never change a run's numbers: runs differing only in them are one grid point.
NOT_RESULT_KEYS = ("seed", "device", "workers", "data_dir", "download", "generated", "checkpoint_every_steps",
                   "keep_checkpoints", "tracker", "preset")
_FAILED_STATES = ("FAIL", "CANCEL", "TIMEOUT", "OUT_OF_MEMORY", "PREEMPT", "BOOT_FAIL", "DEADLINE", "ERROR")


@dataclass
class SweepRun:
    """One run of a sweep: its folder (relative to the sweep), grid point (key -> value text) and seed."""

    dir: str
    point: dict[str, str]
    seed: int
    path: Path

    def point_text(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.point.items()) or "(all)"


@dataclass
class Sweep:
    """The runs of a sweep folder and its grid: swept keys in order, each with its values in order."""

    root: Path
    grid: dict[str, list[str]]
    runs: list[SweepRun]
    source: str  # "sweep.yaml" or "config.yaml files"

    @property
    def keys(self) -> list[str]:
        return list(self.grid)

    def points(self) -> list[tuple[str, ...]]:
        """The grid points that have runs, in grid order."""
        rank = {k: {v: i for i, v in enumerate(vs)} for k, vs in self.grid.items()}
        found = {tuple(r.point.get(k, "") for k in self.keys) for r in self.runs}
        return sorted(found, key=lambda p: tuple(rank[k].get(v, len(rank[k])) for k, v in zip(self.keys, p)))


@dataclass
class RunFlags:
    """An evaluated run: its report and the per-point flags of every metric (``clean``, ``NORM ATTACK@EPS``)."""

    run: SweepRun
    report: EvalReport
    flags: dict[str, Any] = field(default_factory=dict)  # metric -> bool tensor over the points
    about: dict[str, dict[str, str]] = field(default_factory=dict)  # metric -> norm, eps, attack


def is_sweep_folder(path: str | Path) -> bool:
    """A folder with a sweep manifest, or one that is no run itself (no config.yaml) but holds runs below it."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MANIFEST).is_file():
        return True
    return not (path / "config.yaml").is_file() and next(path.glob("*/**/config.yaml"), None) is not None


def load_sweep(root: str | Path) -> Sweep:
    """The sweep in ``root`` (from its manifest, else from the run folders below it)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"sweep folder {root} does not exist: pass the --out folder of submit.py sweep")
    manifest = root / MANIFEST
    if manifest.is_file():
        return _from_manifest(root, manifest)
    return _discover(root)


def _from_manifest(root: Path, manifest: Path) -> Sweep:
    bad = f"{manifest} is not a sweep manifest of submit.py ({SWEEP_FORMAT})"
    try:
        data = yaml.safe_load(manifest.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{bad}: {str(e).splitlines()[0][:160]}; fix or remove it") from None
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{bad}: format {found!r}; fix or remove it")
    try:
        grid = {str(k): [str(v) for v in vs] for k, vs in (data.get("grid") or {}).items()}
        runs = [SweepRun(str(r["dir"]), {str(k): str(v) for k, v in (r.get("point") or {}).items()}, int(r["seed"]),
                         root / str(r["dir"])) for r in data.get("runs") or []]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise UserError(f"{bad}: its grid or runs are malformed (each run needs dir, point and seed)") from None
    if not runs:
        raise UserError(f"{manifest} lists no runs: submit the sweep first (python submit.py sweep ...)")
    for r in runs:  # keys a run's point has beyond the grid (an older manifest) join it
        for k, v in r.point.items():
            if v not in grid.setdefault(k, []):
                grid[k].append(v)
    return Sweep(root, grid, runs, MANIFEST)


def _discover(root: Path) -> Sweep:
    from training.config import load_yaml

    folders = sorted(p.parent for p in root.glob("**/config.yaml") if "eval" not in p.relative_to(root).parts[:-1])
    if not folders:
        raise UserError(f"{root} holds no run folders (no */config.yaml below it) and no {MANIFEST}: pass a sweep "
                        "folder, or RUN_A RUN_B to compare runs")
    configs = [load_yaml(f / "config.yaml") for f in folders]
    keys = [k for k in dict.fromkeys(k for c in configs for k in c) if k not in NOT_RESULT_KEYS]
    swept = [k for k in keys if len({_text(c.get(k)) for c in configs}) > 1]
    grid = {k: _ordered({_text(c.get(k)) for c in configs}) for k in swept}
    runs = []
    for folder, c in zip(folders, configs):
        try:
            seed = int(c.get("seed", 0))
        except (TypeError, ValueError):
            raise UserError(f"{folder / 'config.yaml'} has seed {c.get('seed')!r}, not an integer") from None
        runs.append(SweepRun(folder.relative_to(root).as_posix(), {k: _text(c.get(k)) for k in swept}, seed, folder))
    return Sweep(root, grid, runs, "config.yaml files")


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _ordered(values: set[str]) -> list[str]:
    """Numbers in numeric order, else texts in text order."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


# ------------------------------------------------------------------------------------- reading results
def read_flags(sweep: Sweep) -> tuple[list[RunFlags], list[str]]:
    """The evaluated runs with their flags, and ``"DIR (reason)"`` for every run without an evaluation.

    Every evaluated run must have been evaluated on the same points (``UserError`` naming two that differ).
    """
    jobs = _failed_jobs(sweep.root)
    done, missing = [], []
    for run in sweep.runs:
        report_file = run.path / "eval" / "report.json"
        if not report_file.is_file():
            missing.append(f"{run.dir} ({jobs.get(run.dir) or _progress(run.path)})")
            continue
        done.append(_run_flags(run, read_report(report_file)))
    if done:
        first = done[0]
        for other in done[1:]:
            check_same_points(first.run.dir, first.report, other.run.dir, other.report,
                              hint="or leave the odd run out of the sweep folder")
    return done, missing


def _run_flags(run: SweepRun, report: EvalReport) -> RunFlags:
    out = RunFlags(run, report)
    bits = report.raw.get("per_sample") or {}
    if "clean" not in bits:
        raise UserError(f"{report.path} has no per-point flags (per_sample): rerun eval_autoattack.py on "
                        f"{run.path} with --resume")
    out.flags["clean"], out.about["clean"] = flags_of(bits["clean"]), {"norm": "", "eps": "", "attack": "clean"}
    for norm in report.norms or [report.norm or "Linf"]:
        part = report.threat(norm) or report
        part_bits = part.raw.get("per_sample") or {}
        for row in part.rows:
            flags = (part_bits.get(row.eps_str) or {}).get(row.attack)
            if flags is not None:
                metric = metric_name(norm, row.attack, row.eps_str)
                out.flags[metric] = flags_of(flags)
                out.about[metric] = {"norm": norm, "eps": row.eps_str, "attack": row.attack}
    return out


def metric_name(norm: str, attack: str, eps: str) -> str:
    """``Linf aa@8/255``: the norm, then the attack and eps as ``per_sample.csv`` names its columns."""
    return f"{norm} {attack}@{eps}"


def _progress(run_dir: Path) -> str:
    """Why a run has no evaluation yet, as far as its folder tells."""
    if not run_dir.is_dir():
        return "not started"
    log = run_dir / "log.csv"
    if not log.is_file():
        return "not trained yet"
    try:
        done = int(pd.read_csv(log)["epoch"].max())
        from training.config import load_yaml

        epochs = int(load_yaml(run_dir / "config.yaml").get("epochs", done))
    except (UserError, KeyError, ValueError, OSError, pd.errors.ParserError):
        return "not evaluated"
    return f"training, epoch {done} of {epochs}" if done < epochs else "not evaluated"


def _failed_jobs(root: Path) -> dict[str, str]:
    """Run folder -> ``failed: KIND job ID STATE`` for the failed jobs in ``SWEEP/jobs.csv`` (if any)."""
    path = root / "jobs.csv"
    if not path.is_file():
        return {}
    try:
        jobs = pd.read_csv(path, dtype=str).fillna("")
    except (OSError, ValueError, pd.errors.ParserError):
        return {}
    failed = {}
    for _, job in jobs.iterrows():
        state = str(job.get("state", "")).upper()
        if any(s in state for s in _FAILED_STATES):
            failed[str(job.get("dir", ""))] = f"failed: {job.get('kind', '')} job {job.get('job_id', '')} {state}"
    return failed


def parse_baseline(text: Optional[str], sweep: Sweep) -> Optional[tuple[str, ...]]:
    """The grid point ``--baseline KEY=V,...`` names (values compare as texts or as numbers), or None."""
    if text is None:
        return None
    wanted = {}
    for item in [t for t in text.split(",") if t.strip()]:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--baseline {text!r}: write KEY=VALUE[,KEY=VALUE...], e.g. --baseline alpha=10,beta=3")
        if key.strip() not in sweep.grid:
            raise UserError(f"--baseline {text!r}: {key.strip()!r} is not a swept key; the sweep's keys are: "
                            f"{', '.join(sweep.keys) or 'none (one grid point)'}")
        wanted[key.strip()] = value.strip()
    matches = [p for p in sweep.points()
               if all(_same(p[sweep.keys.index(k)], v) for k, v in wanted.items())]
    if len(matches) != 1:
        found = "no grid point" if not matches else f"{len(matches)} grid points"
        raise UserError(f"--baseline {text!r} matches {found}; name one of: "
                        + "; ".join(",".join(f"{k}={v}" for k, v in zip(sweep.keys, p)) for p in sweep.points()))
    return matches[0]


def _same(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    except ValueError:
        return False
