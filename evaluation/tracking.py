"""An evaluation's accuracies as tracker scalars (``eval_autoattack.py --tracker``, default TensorBoard).

The scalars are read back from the ``report.json`` just written, so the tracker holds exactly its
numbers (fractions in [0, 1]): ``eval/clean``, ``eval/NORM/ATTACK at EPS`` for every norm, eps and
attack of the report (``ATTACK`` as in ``per_sample.csv``: ``aa``, ``pgd20``, ``worst``, ...), and
``eval/corruptions/mean`` with ``eval/corruptions/NAME s SEVERITY`` when corruptions ran. They go
to ``OUT/tb`` (TensorBoard; ``tensorboard --logdir RUN`` shows them beside the training curves in
``RUN/tb``) at step = the evaluated checkpoint's epoch (0 when unknown); evaluating the same
checkpoint again into the same ``OUT`` replaces its points.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.tracking import make_tracker


def report_scalars(report: dict[str, Any]) -> dict[str, float]:
    """Tag -> accuracy of every figure of a ``report.json`` dict (see the module's docstring)."""
    scalars = {"eval/clean": float(report["clean_accuracy"])}
    sections = (report.get("sections") or {}).values()
    parts = [report, *(p for p in sections if isinstance(p, dict) and "results" in p and "clean_accuracy" in p)]
    for part in parts:
        norm = (part.get("settings") or {}).get("norm", "Linf")
        for row in part["results"]:
            scalars[f"eval/{norm}/{row['attack']} at {row['eps_str']}"] = float(row["robust_accuracy"])
    corruptions = (report.get("sections") or {}).get("corruptions")
    if isinstance(corruptions, dict):
        scalars["eval/corruptions/mean"] = float(corruptions["mean_accuracy"])
        for row in corruptions.get("results", []):
            scalars[f"eval/corruptions/{row['corruption']} s{row['severity']}"] = float(row["accuracy"])
    return scalars


def report_step(report: dict[str, Any]) -> int:
    """The tracker step of a report: the epoch of the evaluated checkpoint, 0 when it has none."""
    epoch = (report.get("model") or {}).get("epoch")
    return epoch if isinstance(epoch, int) and epoch >= 0 else 0


def track_report(tracker: str, out: str | Path, report_json: str | Path) -> None:
    """Log the accuracies of ``report_json`` with ``tracker`` into the evaluation folder ``out``."""
    report = json.loads(Path(report_json).read_text())
    source = Path(str((report.get("model") or {}).get("source") or "model"))
    settings = {"model": report.get("model", {}).get("path"), "command": report.get("command")}
    step = report_step(report)
    with make_tracker(tracker, out, run_name=f"{source.name}/{Path(out).name}", config=settings, job="eval") as t:
        t.start(first_step=step)
        t.log(report_scalars(report), step=step)
