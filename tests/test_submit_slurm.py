"""submit.py against a real one-node Slurm cluster (tests/slurm_cluster.py; skipped where Slurm is not installed).

- ``submit.py train --wait`` with two of Slurm's time-limit warnings mid-run (USR2, the signal that
  ``--signal`` asks for): the job saves at a step boundary, requeues itself twice, and ends with a
  ``last.pt`` bitwise equal to a direct ``train_at.py`` run; past ``--max-requeues`` a job stops with
  its checkpoint, fails, and ``--wait`` exits 1;
- a 2-task job (gloo, 1 CPU each) trains bitwise like ``torchrun --nproc_per_node 2``, and its 2-task
  evaluation writes the ``per_sample.csv`` of any number of processes;
- a 2x2 grid x 2 seeds sweep with evaluations: one run folder per point and seed, the manifest,
  evaluations after their training; one evaluation pre-empted mid-way (``scontrol requeue``: SIGTERM,
  then Slurm requeues it) ends with the same ``per_sample.csv`` as an uninterrupted evaluation;
  submitting the sweep again submits nothing;
- an unknown partition: one line, exit 2, nothing queued and no folder made.

The job to signal is frozen (SIGSTOP) the moment it has made progress, so the signal lands mid-run
on any machine; the test then checks from the job's own log that it did. Slurm delays a requeued
job by two minutes; the tests move its start to now (``scontrol update StartTime=now``). Every
python start costs seconds of imports, so ``submit.py`` and the reference runs are called in this
process (``cluster.cli.main``, ``train_at.main``: what the scripts run); the jobs are processes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cluster.commands import parse_train
from conftest import fixture_seed

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
EPOCHS = 4  # 2 steps of 64 images per epoch


def train_args(epochs: int = EPOCHS, seed: bool = True) -> list[str]:
    """A short quickstart: 128 training images (the rest held out), 16 of them monitored with PGD-1."""
    return ["--preset", "quickstart", "--epochs", str(epochs), "--val-size", str(1437 - 128), "--eval-subset", "16",
            "--eval-pgd-steps", "1", "--no-progress"] + ["--seed", str(fixture_seed())] * seed


TRAIN = train_args()
EVAL = ["--attacks", "clean", "pgd20", "--eps", "8/255", "16/255", "--n-ex", "40", "--chunk-size", "5", "--quiet"]
N_CHUNK_RESULTS = 2 * 8  # eps x chunks of pgd20


def env(slurm) -> dict[str, str]:
    return {**os.environ, **slurm.env(), "OMP_NUM_THREADS": "1"}


def run(slurm, *argv: str) -> subprocess.CompletedProcess:
    out = subprocess.run([PY, *argv], cwd=ROOT, env=env(slurm), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise AssertionError(f"{argv[0]} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


@contextlib.contextmanager
def cluster_env(slurm):
    """``SLURM_CONF`` (and one thread per job) for the Slurm commands this process runs and the jobs it submits."""
    saved = dict(os.environ)
    os.environ.update(env(slurm))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def submit(slurm, *argv: str, expect: int = 0) -> str:
    """``python submit.py ARGV`` in this process; its standard output."""
    from cluster.cli import main

    out, err = io.StringIO(), io.StringIO()
    with cluster_env(slurm), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    assert code == expect, f"submit.py exited with {code}:\n{out.getvalue()}\n{err.getvalue()}"
    return out.getvalue()


def evaluate_directly(run_dir: Path, out: Path) -> Path:
    """``per_sample.csv`` of what ``python eval_autoattack.py RUN EVAL --out OUT`` runs, in one process."""
    import eval_autoattack

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert eval_autoattack.main([str(run_dir), *EVAL, "--out", str(out)]) == 0
    return out / "per_sample.csv"


def train_directly(out: Path, argv: list[str]) -> Path:
    """The uninterrupted reference: what ``python train_at.py ARGV --out OUT`` runs."""
    import train_at

    with contextlib.redirect_stdout(io.StringIO()):
        assert train_at.main([*argv, "--out", str(out)]) == 0
    return out


def job_ids(stdout: str, kind: str) -> list[str]:
    return re.findall(rf"submitted {kind} job (\d+)", stdout)


def wait_until(what: str, ready, timeout: float = 300.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def state(slurm, job: str) -> str:
    out = slurm.run("scontrol", "show", "job", "-o", job).stdout
    return re.search(r"JobState=(\S+)", out).group(1) + " " + re.search(r"Reason=(\S+)", out).group(1)


def freeze(slurm, job: str) -> list[int]:
    """SIGSTOP the job's python processes (its step 0): nothing moves until :func:`thaw`."""
    lines = slurm.run("scontrol", "listpids", job, check=True).stdout.splitlines()[1:]
    pids = [int(f[0]) for f in map(str.split, lines) if f[2] == "0"]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


def release(slurm, job: str) -> None:
    """Start a requeued job now rather than after Slurm's two-minute delay."""
    wait_until(f"job {job} requeued", lambda: state(slurm, job).startswith("PENDING"), every=0.2)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=True)


def wait_ended(slurm, jobs: list[str], timeout: float = 900.0) -> dict[str, str]:
    def ended():
        states = {j: state(slurm, j).split()[0] for j in jobs}
        return states if all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states.values()) else None
    return wait_until("the jobs to end", ended, timeout=timeout, every=0.5)


def rows(path: Path) -> list[dict]:
    return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records") if path.is_file() else []


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every tensor of two ``last.pt`` equal to the bit (the log history holds wall times, so not it)."""
    sa, sb = (torch.load(p / "checkpoints" / "last.pt", weights_only=True) for p in (a, b))

    def tensors(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            yield prefix, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(v, f"{prefix}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f"{prefix}/{i}")

    ta = dict(tensors({k: v for k, v in sa.items() if k != "history"}))
    tb = dict(tensors({k: v for k, v in sb.items() if k != "history"}))
    assert ta.keys() == tb.keys() and len(ta) > 10
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ[:5]
    assert (sa["epoch"], sa["global_step"], sa["step_in_epoch"]) == (sb["epoch"], sb["global_step"], 0)


def waiting_submit(slurm, argv: list[str], expect: int) -> tuple[threading.Thread, dict]:
    """``submit.py ARGV`` (with ``--wait``) in a thread: the test signals the job meanwhile."""
    ended: dict = {}
    thread = threading.Thread(target=lambda: ended.update(out=submit(slurm, *argv, expect=expect)))
    thread.start()
    return thread, ended


def test_a_train_job_requeued_at_two_time_limits_equals_a_direct_run(slurm, tmp_path):
    run_dir = tmp_path / "run"
    waiting, ended = waiting_submit(slurm, ["train", "--wait", "--", *TRAIN, "--out", str(run_dir)], expect=0)
    job = wait_until("the job id", lambda: rows(run_dir / "jobs.csv"))[0]["job_id"]
    log = run_dir / "log.csv"
    for allocation, epochs_logged in ((1, 1), (2, 2)):
        wait_until(f"epoch {epochs_logged} in allocation {allocation}",
                   lambda: len(rows(run_dir / "allocations.csv")) == allocation and len(rows(log)) >= epochs_logged)
        pids = freeze(slurm, job)
        slurm.run("scancel", "--signal=USR2", job, check=True)  # what Slurm sends --signal-delay s before the limit
        thaw(pids)
        release(slurm, job)
    waiting.join(timeout=900)
    assert f"train job {job} ({run_dir}): COMPLETED" in ended["out"], ended
    allocations = rows(run_dir / "allocations.csv")
    assert [a["outcome"] for a in allocations] == ["time limit: saved and requeued"] * 2 + ["finished"]
    assert [a["allocation"] for a in allocations] == ["1", "2", "3"] and {a["job_id"] for a in allocations} == {job}
    stops = [int(s) for s in re.findall(r"stopped by SIGUSR2 at global step (\d+)",
                                        (run_dir / "jobs" / f"{job}_0_log.err").read_text())]
    assert len(stops) == 2 and 0 < stops[0] < stops[1] < 2 * EPOCHS, stops  # both mid-run, the second later
    assert_same_checkpoint(run_dir, train_directly(tmp_path / "direct", TRAIN))
    [row] = rows(run_dir / "jobs.csv")
    assert (row["kind"], row["dir"], row["state"], row["executor"]) == ("train", ".", "COMPLETED", "slurm")
    assert Path(row["stdout"]).is_file() and Path(row["stderr"]).is_file()


def test_past_max_requeues_a_job_stops_with_its_checkpoint(slurm, tmp_path):
    run_dir = tmp_path / "run"
    argv = ["train", "--max-requeues", "0", "--wait", "--", *TRAIN, "--out", str(run_dir)]
    waiting, ended = waiting_submit(slurm, argv, expect=1)
    job = wait_until("the job id", lambda: rows(run_dir / "jobs.csv"))[0]["job_id"]
    wait_until("the first epoch", lambda: rows(run_dir / "allocations.csv") and len(rows(run_dir / "log.csv")) >= 1)
    pids = freeze(slurm, job)
    slurm.run("scancel", "--signal=USR2", job, check=True)
    thaw(pids)
    waiting.join(timeout=600)
    assert f"train job {job} ({run_dir}): FAILED" in ended["out"], ended  # and --wait exited with 1
    [alloc] = rows(run_dir / "allocations.csv")
    assert alloc["outcome"].startswith("time limit: not requeued, --max-requeues 0 reached")
    assert f"-- --resume {run_dir}" in alloc["outcome"]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["global_step"] < 2 * EPOCHS  # saved where it stopped
    assert rows(run_dir / "jobs.csv")[0]["state"] == "FAILED"


def test_a_two_task_job_equals_torchrun(slurm, tmp_path):
    train = train_args(epochs=2)
    two = ["--tasks-per-node", "2", "--cpus-per-task", "1", "--wait"]
    submit(slurm, "train", *two, "--", *train, "--out", str(tmp_path / "slurm"))
    run(slurm, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_at.py", *train,
        "--out", str(tmp_path / "torchrun"))
    assert_same_checkpoint(tmp_path / "slurm", tmp_path / "torchrun")
    assert torch.load(tmp_path / "slurm" / "checkpoints" / "last.pt", weights_only=True)["world_size"] == 2
    submit(slurm, "eval", *two, "--", str(tmp_path / "slurm"), *EVAL)
    report = json.loads((tmp_path / "slurm" / "eval" / "report.json").read_text())
    assert report["environment"]["processes"] == 2
    # the flags of a sharded evaluation are those of any number of processes (test_eval_sharded.py), so the
    # reference is one process, as torchrun with any --nproc_per_node would give
    by_slurm = (tmp_path / "slurm" / "eval" / "per_sample.csv").read_bytes()
    assert by_slurm == evaluate_directly(tmp_path / "slurm", tmp_path / "eval_one").read_bytes()


GRID = ["--grid", "alpha=10,20", "--grid", "beta=3,4", "--seeds", "0", "1"]
SWEEP_TRAIN = train_args(epochs=1, seed=False)  # the seeds come from --seeds
POINTS = [(alpha, beta, seed) for alpha in (10, 20) for beta in (3, 4) for seed in (0, 1)]
DIRS = [f"alpha={a},beta={b}/seed{s}" for a, b, s in POINTS]
PREEMPTED = "alpha=20,beta=4/seed1"


@pytest.fixture(scope="module")
def sweep(slurm, tmp_path_factory) -> dict:
    """The sweep, its last run's evaluation pre-empted once mid-way; returns what the tests check."""
    folder = tmp_path_factory.mktemp("sweep") / "abl"
    argv = ["sweep", *GRID, "--out", str(folder), "--eval-args", " ".join(EVAL), "--cpus-per-task", "1",
            "--", *SWEEP_TRAIN]
    out = submit(slurm, *argv)
    trains, evals = job_ids(out, "train"), job_ids(out, "eval")
    cache = folder / PREEMPTED / "eval" / "cache"
    wait_until("a finished chunk of the last evaluation", lambda: any(cache.glob("*_c0*.pt")), timeout=900)
    pids = freeze(slurm, evals[-1])
    chunks_done = len(list(cache.glob("*_c0*.pt")))
    slurm.run("scontrol", "requeue", evals[-1], check=True)  # as a pre-emption: SIGTERM, then Slurm requeues it
    thaw(pids)
    release(slurm, evals[-1])
    states = wait_ended(slurm, trains + evals)
    return {"folder": folder, "argv": argv, "out": out, "trains": trains, "evals": evals, "states": states,
            "chunks_done": chunks_done}


def test_a_sweep_runs_every_point_and_seed_then_its_evaluation(sweep):
    folder = sweep["folder"]
    assert set(sweep["states"].values()) == {"COMPLETED"}
    manifest = yaml.safe_load((folder / "sweep.yaml").read_text())
    assert manifest == {"format": "gkl-at-sweep/1", "train_args": SWEEP_TRAIN, "eval_args": EVAL,
                        "grid": {"alpha": ["10", "20"], "beta": ["3", "4"]}, "seeds": [0, 1],
                        "runs": [{"dir": d, "point": {"alpha": str(a), "beta": str(b)}, "seed": s}
                                 for d, (a, b, s) in zip(DIRS, POINTS)]}
    jobs = rows(folder / "jobs.csv")
    assert [(j["kind"], j["dir"]) for j in jobs] == [(k, d) for d in DIRS for k in ("train", "eval")]
    assert [j["job_id"] for j in jobs] == [x for pair in zip(sweep["trains"], sweep["evals"]) for x in pair]
    configs = []
    for d, (alpha, beta, seed) in zip(DIRS, POINTS):  # each run's config is train_at.py's for its point and seed
        point = [*SWEEP_TRAIN, "--alpha", str(alpha), "--beta", str(beta), "--seed", str(seed), "--out", "x"]
        expected = yaml.safe_dump(parse_train(point)[1].to_dict(), sort_keys=False)
        configs.append((folder / d / "config.yaml").read_text())
        assert configs[-1] == expected
        assert (folder / d / "eval" / "per_sample.csv").is_file()
        eval_start = rows(folder / d / "eval" / "allocations.csv")[0]["start"]
        assert eval_start >= rows(folder / d / "allocations.csv")[-1]["end"]  # after its training ended
    assert len(set(configs)) == len(DIRS)


def test_a_preempted_sweep_evaluation_equals_an_uninterrupted_one(sweep, tmp_path):
    assert 0 < sweep["chunks_done"] < N_CHUNK_RESULTS  # pre-empted mid-way
    allocations = rows(sweep["folder"] / PREEMPTED / "eval" / "allocations.csv")
    assert [a["outcome"].split(" (")[0] for a in allocations] == ["stopped by SIGTERM", "finished"]
    resumed = (sweep["folder"] / PREEMPTED / "eval" / "per_sample.csv").read_bytes()
    assert resumed == evaluate_directly(sweep["folder"] / PREEMPTED, tmp_path / "eval").read_bytes()


def test_submitting_the_sweep_again_submits_nothing(slurm, sweep):
    before = rows(sweep["folder"] / "jobs.csv")
    assert {job["state"] for job in before} == {"SUBMITTED"}  # submitted without --wait
    out = submit(slurm, *sweep["argv"])
    assert not job_ids(out, "train") and not job_ids(out, "eval") and "nothing to submit" in out
    after = rows(sweep["folder"] / "jobs.csv")  # the same jobs, their states brought up to date
    assert [{**job, "state": "COMPLETED"} for job in before] == after
    assert out.count("finished and evaluated") == 8


def test_an_unknown_partition_submits_nothing(slurm, tmp_path, capsys):
    from cluster.cli import main

    with cluster_env(slurm):
        code = main(["train", "--partition", "nosuchpartition", "--", *TRAIN, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "partition" in err[0], err
    assert not (tmp_path / "run").exists()
    assert slurm.run("squeue", "-h", "-o", "%i").stdout.strip() == ""
