"""What a (re)submitted sweep submits for each run: nothing, a resume, or a new job; and its evaluation.

Every run's training and evaluation command is resolved here, with the scripts' own parsers,
before anything is submitted: a value that does not fit its key ends the whole submission with
one line naming the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from errors import UserError

from .commands import Planned, eval_job, finished_epoch, parse_train, train_job
from .submission import ACTIVE, refresh_states
from .sweep import Sweep


@dataclass
class RunPlan:
    """One run of a sweep: the jobs to submit for it and why the others are not."""

    dir: str
    train: Optional[Planned] = None
    eval: Optional[Planned] = None
    after: Optional[str] = None  # a training job still queued from an earlier submission
    notes: list[str] = field(default_factory=list)


def active_job(rows: list[dict], kind: str) -> Optional[str]:
    """The id of a job of ``kind`` among ``rows`` of ``jobs.csv`` (states refreshed) still queued or running."""
    return next((r["job_id"] for r in reversed(rows) if r["kind"] == kind and r["state"] in ACTIVE), None)


def plan_run(sweep: Sweep, run: dict, folder: Path, max_requeues: int, jobs: list[dict]) -> RunPlan:
    """The plan of one run (see the module docstring); ``jobs``: the rows of ``jobs.csv`` for this run."""
    plan, run_dir = RunPlan(run["dir"]), folder / run["dir"]
    argv = sweep.run_argv(run, folder)
    try:
        _, cfg, _, _ = parse_train(argv)
        busy_train = active_job(jobs, "train")
        done = finished_epoch(run_dir, cfg.epochs)
        if busy_train:
            plan.after = busy_train
            plan.notes.append(f"training job {busy_train} is still queued or running")
        elif done is None:
            resume = any((run_dir / "checkpoints").glob("*.pt"))
            plan.train, _ = train_job(argv, max_requeues, resume_first=resume)
            plan.train.name = f"train:{run['dir']}"
            plan.notes.append("resumed" if resume else "new")
        if not sweep.eval_args:
            return plan
        busy_eval = active_job(jobs, "eval")
        evaluated = (run_dir / "eval" / "report.json").is_file()
        if busy_eval:
            plan.notes.append(f"evaluation job {busy_eval} is still queued or running")
        elif plan.train is None and done is not None and evaluated:
            plan.notes.append("finished and evaluated")
        else:
            eval_argv = sweep.eval_argv(run, folder)
            if (run_dir / "eval" / "cache").is_dir():
                eval_argv.append("--resume")  # finished chunks of an interrupted evaluation are kept
            plan.eval, _ = eval_job(eval_argv, max_requeues, source_may_wait=True)
            plan.eval.name = f"eval:{run['dir']}"
    except UserError as e:
        raise UserError(f"{run['dir']}: {e}") from None
    return plan


def plan_sweep(sweep: Sweep, folder: Path, max_requeues: int) -> list[RunPlan]:
    """The plan of every run of the sweep, in the manifest's order."""
    rows = refresh_states(folder / "jobs.csv")
    return [plan_run(sweep, run, folder, max_requeues, [r for r in rows if r["dir"] == run["dir"]])
            for run in sweep.runs]
