"""Submitting planned jobs through submitit, recording them in ``jobs.csv``, and waiting for them.

On Slurm an evaluation depends on its training job (``afterok``): it starts once the training
succeeded and is cancelled if it failed. The local executor has no queue, so its jobs run one after
another: each waits for the one before, and an evaluation whose training failed is not started.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from errors import UserError

from .commands import Planned
from .options import dry_run, make_executor
from .record import JOB_COLUMNS, append_jobs, now_text, read_rows, update_job_states, write_rows

# Slurm states of a job that has not ended (a requeued job passes through REQUEUED back to PENDING)
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "COMPLETING", "CONFIGURING", "RESIZING",
          "SUSPENDED", "STAGE_OUT", "SIGNALING", "RUNNING_LOCAL"}


def slurm_state(job_id: str) -> str:
    """A Slurm job's state: ``scontrol`` while the controller remembers it, then ``sacct`` (UNKNOWN if neither)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=60)
    m = re.search(r"\bJobState=(\S+)", out.stdout)
    if m:
        return m.group(1)
    try:
        acct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)], capture_output=True,
                              text=True, timeout=60)
        states = acct.stdout.split()
    except OSError:
        states = []
    return states[-1].split()[0] if states else "UNKNOWN"


def local_state(job: Any) -> str:
    """A local job's state in Slurm's words: RUNNING, COMPLETED (returned) or FAILED."""
    if not job.done():
        return "RUNNING"
    try:
        job.results()
    except Exception:  # submitit raises the job's own error, or that it ended without a result
        return "FAILED"
    return "COMPLETED"


def local_alive(job_id: str) -> bool:
    """Whether the local executor's controller process ``job_id`` still runs (a job of an earlier submit)."""
    try:
        return "submitit" in Path(f"/proc/{int(job_id)}/cmdline").read_text()
    except (OSError, ValueError):
        return False


def recorded_state(row: dict) -> str:
    """The state now of a job recorded in ``jobs.csv`` (its recorded state when nothing better is known)."""
    if (row.get("executor") or "slurm") == "slurm":
        state = slurm_state(row["job_id"])
        return row["state"] if state == "UNKNOWN" else state
    if local_alive(row["job_id"]):
        return "RUNNING"
    from submitit.core.utils import pickle_load

    result = Path(row["stdout"]).with_name(f"{row['job_id']}_0_result.pkl")
    try:
        return "COMPLETED" if pickle_load(result)[0] == "success" else "FAILED"
    except Exception:  # no result: the job ended without one (killed, or it failed and said so in its log)
        return "FAILED"


def refresh_states(path: Path) -> list[dict]:
    """The rows of ``jobs.csv`` with the current state of every job not known to have ended (written back)."""
    rows = read_rows(path)
    changed = False
    for row in rows:
        if row["state"] in ACTIVE or row["state"] == "SUBMITTED":
            state = recorded_state(row)
            changed |= state != row["state"]
            row["state"] = state
    if changed:
        write_rows(path, JOB_COLUMNS, rows)
    return rows


class Submitter:
    """Submits jobs, prints them, appends them to ``record_dir/jobs.csv`` and (``wait``) waits for them."""

    def __init__(self, opts: argparse.Namespace, record_dir: Path) -> None:
        self.opts, self.record_dir = opts, record_dir
        self.jobs_csv, self.folder = record_dir / "jobs.csv", record_dir / "jobs"
        self.jobs: dict[str, tuple[Planned, Any]] = {}

    def check(self, planned: Planned) -> None:
        """``sbatch --test-only`` of the first job: a bad partition or account fails before anything is queued."""
        dry_run(make_executor(self.opts, self.folder, planned.name))

    def submit(self, planned: Planned, after: Optional[str] = None) -> Optional[str]:
        """Submit ``planned`` (after job ``after`` succeeded); its job id, or None when ``after`` failed locally."""
        if self.opts.executor == "local" and self.jobs:
            last = list(self.jobs)[-1]
            print(f"local executor: waiting for job {last} before the next", flush=True)
            self._wait_for([last])
            if after is not None and self.state(after) != "COMPLETED":
                print(f"not started: {planned.name} (job {after}, which it needs, did not finish)")
                return None
        ex = make_executor(self.opts, self.folder, planned.name, after if self.opts.executor == "slurm" else None)
        try:
            job = ex.submit(planned.job)
        except Exception as e:  # sbatch's own message, e.g. a limit of the account
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise UserError(f"submitting {planned.name} failed: {lines[-1] if lines else e}; the jobs submitted "
                            f"before it are listed in {self.jobs_csv}") from None
        self.jobs[job.job_id] = (planned, job)
        rel = os.path.relpath(planned.run_dir, self.record_dir)
        append_jobs(self.jobs_csv, [{"job_id": job.job_id, "kind": planned.kind, "dir": rel, "state": "SUBMITTED",
                                     "executor": self.opts.executor, "submitted": now_text(),
                                     "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}])
        wait = f" after job {after}" if after else ""
        print(f"submitted {planned.kind} job {job.job_id}{wait} | run {planned.run_dir} | logs {job.paths.stdout} "
              f"{job.paths.stderr.name}", flush=True)
        return job.job_id

    def state(self, job_id: str) -> str:
        _, job = self.jobs[job_id]
        return local_state(job) if self.opts.executor == "local" else slurm_state(job_id)

    def _wait_for(self, ids: list[str]) -> dict[str, str]:
        states, start = {}, time.monotonic()
        while True:
            states = {i: self.state(i) for i in ids}
            if all(s not in ACTIVE for s in states.values()):
                return states
            waited = time.monotonic() - start
            time.sleep(1.0 if waited < 60 else 5.0 if waited < 600 else 30.0)

    def wait(self) -> bool:
        """Block until every submitted job ended; print and record their final states; True if all finished."""
        if not self.jobs:
            return True
        print(f"waiting for {len(self.jobs)} job(s)...", flush=True)
        states = self._wait_for(list(self.jobs))
        update_job_states(self.jobs_csv, states)
        for job_id, state in states.items():
            planned, job = self.jobs[job_id]
            tail = "" if state == "COMPLETED" else f" (see {job.paths.stderr})"
            print(f"{planned.kind} job {job_id} ({planned.run_dir}): {state}{tail}")
        return all(s == "COMPLETED" for s in states.values())

    def summary(self) -> None:
        print(f"{len(self.jobs)} job(s) submitted; recorded in {self.jobs_csv}")
