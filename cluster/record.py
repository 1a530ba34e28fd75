"""The two CSV files a cluster run leaves: ``allocations.csv`` in the run folder, ``jobs.csv`` beside the runs.

``allocations.csv`` (written by the job, rank 0): one row per allocation a job got, so a run
pushed through three time limits has four rows, each with its span and how it ended; its
requeue count is its number of rows less one. ``jobs.csv`` (written by ``submit.py``): one row
per submitted job. Both are plain CSV that pandas reads, rewritten atomically.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Iterable, Optional

from core.files import atomic_write_text

ALLOCATION_COLUMNS = ("job_id", "kind", "allocation", "hosts", "tasks", "start", "end", "seconds", "outcome",
                      "exit_code")
JOB_COLUMNS = ("job_id", "kind", "dir", "state", "executor", "submitted", "stdout", "stderr")
RUNNING = "running"


def now_text() -> str:
    """Local time to the second, ISO 8601 with the UTC offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (none when it does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, columns: Iterable[str], rows: list[dict]) -> None:
    """Atomically write ``rows`` under a header of ``columns`` (missing values empty)."""
    columns = list(columns)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, out.getvalue())


class AllocationLog:
    """``FOLDER/allocations.csv`` of one job: opened at the start of an allocation, closed at its end."""

    def __init__(self, path: Path, job_id: str, kind: str) -> None:
        self.path, self.job_id, self.kind = path, str(job_id), kind
        self._start: Optional[float] = None

    def earlier(self) -> int:
        """How many allocations this job had before the current one (its requeues so far)."""
        rows = [r for r in read_rows(self.path) if r["job_id"] == self.job_id and r["kind"] == self.kind]
        return len(rows) - (1 if self._start is not None else 0)

    def begin(self, hosts: str, tasks: int) -> None:
        """Add this allocation's row; a row an earlier allocation left open (killed outright) is closed."""
        rows = read_rows(self.path)
        for row in rows:
            if row["outcome"] == RUNNING:
                row["outcome"] = "ended without closing its row (killed, or the node failed)"
        count = sum(r["job_id"] == self.job_id and r["kind"] == self.kind for r in rows)
        self._start = time.time()
        rows.append({"job_id": self.job_id, "kind": self.kind, "allocation": count + 1, "hosts": hosts,
                     "tasks": tasks, "start": now_text(), "outcome": RUNNING})
        write_rows(self.path, ALLOCATION_COLUMNS, rows)

    def end(self, outcome: str, exit_code: int) -> None:
        """Close this allocation's row with how it ended."""
        rows = read_rows(self.path)
        mine = [r for r in rows if r["job_id"] == self.job_id and r["kind"] == self.kind]
        if not mine or self._start is None:
            return
        mine[-1].update(end=now_text(), seconds=f"{time.time() - self._start:.1f}", outcome=outcome,
                        exit_code=exit_code)
        write_rows(self.path, ALLOCATION_COLUMNS, rows)


def append_jobs(path: Path, rows: list[dict]) -> None:
    """Add submitted jobs to ``jobs.csv`` (earlier submissions' rows are kept)."""
    write_rows(path, JOB_COLUMNS, read_rows(path) + rows)


def update_job_states(path: Path, states: dict[str, str]) -> None:
    """Set the ``state`` of the jobs in ``states`` (job id -> state) in ``jobs.csv``."""
    rows = read_rows(path)
    for row in rows:
        if row["job_id"] in states:
            row["state"] = states[row["job_id"]]
    write_rows(path, JOB_COLUMNS, rows)
