"""Cluster options of ``submit.py`` and the submitit executor they make (Slurm, or local processes).

Every option is checked before anything is submitted; on Slurm the first job's batch script is
also put to ``sbatch --test-only``, so an unknown partition, account or QOS, or a time limit over
the partition's, ends in one ``error:`` line with nothing in the queue.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

from errors import UserError

ROOT = Path(__file__).resolve().parent.parent  # the repository: the jobs import train_at / eval_autoattack from it
LOCAL_NO_LIMIT_MIN = 365 * 24 * 60  # the local executor always kills at its time limit: none given means a year
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_EXTRA_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")
_MANAGED = {"signal", "output", "error", "open-mode", "job-name", "requeue", "dependency", "array", "ntasks-per-node",
            "nodes", "time", "partition", "account", "qos", "mem", "cpus-per-task", "gpus-per-node"}


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """The options every ``submit.py`` command takes."""
    g = p.add_argument_group("cluster options")
    g.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto",
                   help="slurm, local processes, or auto (default): slurm where sbatch is on PATH, else local")
    g.add_argument("--nodes", type=int, default=1, help="nodes per job (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default: none on Slurm; every visible GPU with --executor local)")
    g.add_argument("--tasks-per-node", type=int, default=None,
                   help="processes per node, one per GPU (default: --gpus-per-node, or 1 without GPUs)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per process (data loader workers + 1)")
    g.add_argument("--mem", default=None, help="memory per node, in Slurm's notation (64G, 500M; default: the "
                                               "partition's)")
    g.add_argument("--time", default=None, metavar="MINUTES",
                   help="time limit of each allocation in minutes (default: the partition's); the job saves and "
                        "requeues itself shortly before it")
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="any further sbatch option, e.g. --slurm-extra constraint=a100 --slurm-extra exclusive "
                        "(repeatable)")
    g.add_argument("--signal-delay", type=int, default=120, metavar="SECONDS",
                   help="how long before the time limit Slurm warns the job, which then saves and requeues "
                        "(default 120; more than one training step or evaluation chunk)")
    g.add_argument("--max-requeues", type=int, default=20,
                   help="requeue a job at most this many times (default 20); then it stops with its checkpoint saved")
    g.add_argument("--wait", action="store_true",
                   help="block until every job has ended; exit 1 if one did not finish")


def _positive(name: str, value: Optional[int], least: int = 1) -> None:
    if value is not None and value < least:
        raise UserError(f"--{name} must be at least {least}, got {value}")


def check_cluster_options(opts: argparse.Namespace) -> None:
    """Resolve ``--executor auto`` and check every cluster option (``UserError`` on the first bad one)."""
    if opts.executor == "auto":
        opts.executor = "slurm" if shutil.which("sbatch") else "local"
    elif opts.executor == "slurm" and not shutil.which("sbatch"):
        raise UserError("--executor slurm: sbatch is not on PATH (this is not a Slurm login node); run the jobs "
                        "as local processes with --executor local")
    for name in ("nodes", "tasks_per_node", "cpus_per_task", "signal_delay"):
        _positive(name.replace("_", "-"), getattr(opts, name))
    for name in ("gpus_per_node", "max_requeues"):
        _positive(name.replace("_", "-"), getattr(opts, name), least=0)
    if opts.time is not None:
        if not re.fullmatch(r"\d+", opts.time.strip()) or int(opts.time) < 1:
            raise UserError(f"--time takes the time limit in whole minutes (e.g. --time 1440 for 24 hours), "
                            f"got {opts.time!r}")
        opts.time = int(opts.time)
    if opts.mem is not None and not _MEM.match(opts.mem):
        raise UserError(f"--mem {opts.mem!r}: give a size such as 64G, 500M or 32000 (megabytes)")
    opts.extra = {}
    for item in opts.slurm_extra:
        key, _, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not _EXTRA_KEY.match(key):
            raise UserError(f"--slurm-extra {item!r}: write KEY=VALUE with an sbatch option name as KEY "
                            "(e.g. constraint=a100), or KEY alone for a flag (e.g. exclusive)")
        if key in _MANAGED:
            raise UserError(f"--slurm-extra {key}: set by submit.py itself (use its own option, see --help)")
        opts.extra[key] = value if value else True
    if opts.executor == "local" and opts.nodes > 1:
        raise UserError("--executor local runs on this machine only: use --nodes 1, or Slurm")
    opts.tasks = opts.tasks_per_node or max(opts.gpus_per_node or 0, 1)


def _local_gpus(opts: argparse.Namespace) -> int:
    """GPUs a local job sees: the executor hides all but the first N (N = every one unless --gpus-per-node)."""
    if opts.gpus_per_node is not None:
        return opts.gpus_per_node
    import torch

    return torch.cuda.device_count()


def make_executor(opts: argparse.Namespace, folder: Path, name: str, after: Optional[str] = None) -> Any:
    """A submitit executor for one job named ``name``, started after job ``after`` succeeded (Slurm only)."""
    import submitit

    setup = [f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if opts.executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=opts.time or LOCAL_NO_LIMIT_MIN, tasks_per_node=opts.tasks,
                             gpus_per_node=_local_gpus(opts), signal_delay_s=opts.signal_delay, setup=setup)
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_requeues)
    extra = {"requeue": True, **opts.extra}
    params: dict[str, Any] = dict(job_name=name, nodes=opts.nodes, ntasks_per_node=opts.tasks, time=opts.time,
                                  signal_delay_s=opts.signal_delay, setup=setup)
    for key in ("cpus_per_task", "partition", "account", "qos", "mem"):
        if getattr(opts, key) is not None:
            params[key] = getattr(opts, key)
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if after is not None:
        params["dependency"] = f"afterok:{after}"
        extra["kill-on-invalid-dep"] = "yes"  # a failed training cancels its evaluation instead of leaving it pending
    ex.update_parameters(**params, additional_parameters=extra)
    return ex


def dry_run(ex: Any) -> None:
    """Put the batch script ``ex`` would submit to ``sbatch --test-only`` (Slurm only; nothing is queued)."""
    import submitit

    if not isinstance(ex, submitit.SlurmExecutor):
        return
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as script:
        script.write(ex._make_submission_file_text("true", "test"))
        script.flush()
        out = subprocess.run(["sbatch", "--test-only", script.name], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {out.returncode}"
        raise UserError(f"Slurm refuses the job ({reason}): check --partition, --account, --qos, --time, --mem "
                        "and --slurm-extra (sinfo lists the partitions); nothing was submitted")
