"""The job a cluster runs: one ``train_at.py`` or ``eval_autoattack.py`` command, requeued until it is done.

A :class:`CommandJob` is what ``submit.py`` hands to submitit: the job calls ``train_at.main(argv)``
or ``eval_autoattack.main(argv)``, the very command a user would type, and re-implements nothing.
Every allocation after the first runs the command's resume form (``train_at.py --resume RUN``,
``eval_autoattack.py ... --resume``), so a requeue is a resume and nothing else. An allocation is
a later one when Slurm says so (``SLURM_RESTART_COUNT``) or when the job, before it ended, replaced
its submitted pickle by :meth:`CommandJob.checkpoint` (submitit's requeue pattern); every process
of the allocation reads the same two facts, so all of them run the same command.

Signals (each process of the job receives them):

- Slurm's warning before the time limit (``--signal=USR2@S``, set by the launcher; submitit's
  ``SUBMITIT_PREEMPT_SIGNAL`` may name another): training saves a checkpoint at the end of the
  current step through the trainer's own stop mechanism (the ranks agree on the step), an
  evaluation stops keeping its finished chunks; then rank 0 requeues the job (``scontrol requeue``;
  under the local executor, submitit's requeue exit code), at most ``max_requeues`` times.
- SIGTERM (pre-emption, ``scontrol requeue``, ``scancel``): the same save, then the job ends without
  a result: Slurm requeues a pre-empted job itself (with ``PreemptMode=REQUEUE``), and a cancelled
  one stays cancelled.

Rank 0 records every allocation in ``allocations.csv`` of the run folder (:mod:`cluster.record`).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .record import AllocationLog

STOPPED_BY_SIGNAL = {130, 128 + signal.SIGTERM}  # the exit codes of a command stopped by a signal


def _export_local_env(env: Any) -> None:
    """torchrun's variables for a task of submitit's local executor with several tasks (Slurm's are read by
    ``core.distributed``)."""
    from core.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN

    if env.num_tasks > 1 and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                          MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(SLURM_PORT_BASE + int(env.job_id) % SLURM_PORT_SPAN))


def _command(kind: str):
    """The entry point of the command a job runs (imported in the job, not by ``submit.py``)."""
    if kind == "train":
        import train_at

        return train_at.main
    import eval_autoattack

    return eval_autoattack.main


@dataclass
class CommandJob:
    """One command run as a cluster job: ``argv`` on its first allocation, ``resume_argv`` on the later ones.

    ``folder`` holds ``allocations.csv`` (the run folder; an evaluation's ``--out``); ``checkpoints``,
    when set, is the folder whose ``*.pt`` files make a later allocation resume rather than start again
    (a run killed before its first checkpoint starts afresh). ``requeued``: set in the copy that
    :meth:`checkpoint` leaves for the next allocation.
    """

    kind: str
    argv: list[str]
    resume_argv: list[str]
    folder: str
    max_requeues: int = 20
    checkpoints: Optional[str] = None
    requeued: bool = False

    def __call__(self) -> int:
        import submitit

        from core.distributed import adopt_slurm_env

        env = submitit.JobEnvironment()
        _export_local_env(env) if env.cluster == "local" else adopt_slurm_env()
        self.warning = submitit.JobEnvironment._usr_sig()
        self.signalled: Optional[int] = None
        self.main_rank = int(os.environ.get("RANK", "0")) == 0
        restarted = self.requeued or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        argv = self.resume_argv if restarted and self._resumable() else self.argv
        for s in (self.warning, signal.SIGTERM):
            signal.signal(s, self._on_signal)
        log = AllocationLog(Path(self.folder) / "allocations.csv", env.job_id, self.kind)
        earlier = log.earlier()
        if self.main_rank:
            log.begin(os.environ.get("SLURM_JOB_NODELIST") or socket.gethostname(), env.num_tasks)
            print(f"{self.kind} job {env.job_id}, allocation {earlier + 1} (requeues left "
                  f"{max(self.max_requeues - earlier, 0)}): {self.kind} {' '.join(argv)}", flush=True)
        code = _command(self.kind)(argv)
        for s in (self.warning, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # the command has ended (and a requeue signals the job)
        return self._finish(code, env, log, earlier)

    def checkpoint(self) -> Any:
        """This job as its next allocation runs it (submitit's ``checkpoint`` hook): resuming."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(dataclasses.replace(self, requeued=True))

    def _leave_resume(self, env: Any) -> None:
        """Replace the job's submitted pickle by :meth:`checkpoint`, which the next allocation loads."""
        from submitit.core.utils import temporary_save_path

        delayed = self.checkpoint()
        delayed.set_timeout(0, 0)  # submitit's own time-out counting is not used: see _finish
        with temporary_save_path(env.paths.submitted_pickle) as tmp:
            delayed.dump(tmp)

    def _resumable(self) -> bool:
        return self.checkpoints is None or any(Path(self.checkpoints).glob("*.pt"))

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Hand the signal to the trainer's handler while it trains (it stops at the end of the step),
        else stop the command at once (an evaluation keeps its finished chunks)."""
        self.signalled = self.signalled or signum
        handler = signal.getsignal(signal.SIGTERM)
        if self.kind == "train" and callable(handler) and handler != self._on_signal:
            handler(signum, frame)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    def _finish(self, code: int, env: Any, log: AllocationLog, earlier: int) -> int:
        """Record how this allocation ended; requeue at the time-limit warning; fail on an error."""
        def close(outcome: str) -> None:
            if self.main_rank:
                log.end(outcome, code)
                print(f"{self.kind} job {env.job_id}: {outcome}", file=sys.stderr, flush=True)

        if code == 0:
            close("finished")
            return 0
        if self.signalled == self.warning and code in (130, 128 + self.warning):
            if earlier >= self.max_requeues:
                close(f"time limit: not requeued, --max-requeues {self.max_requeues} reached "
                      f"(continue with: python submit.py {self.kind} ... -- {' '.join(self.resume_argv)})")
                sys.exit(code)  # the job fails: its dependents do not start
            close("time limit: saved and requeued")
            if self.main_rank:
                self._leave_resume(env)
                env._requeue(self.max_requeues - earlier - 1)  # scontrol requeue / the local requeue exit code
            sys.exit(code)  # no result: the next allocation gives it
        if self.signalled == signal.SIGTERM or code in STOPPED_BY_SIGNAL:
            close("stopped by SIGTERM (pre-empted, requeued or cancelled by Slurm): saved")
            if self.main_rank:
                self._leave_resume(env)
            sys.exit(code)  # no result: Slurm requeues a pre-empted job, a cancelled one ends here
        close(f"failed: exit code {code} (see the job's log)")
        sys.exit(code)
