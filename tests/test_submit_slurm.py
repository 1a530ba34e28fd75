"""submit.py against a real one-node Slurm cluster (tests/slurm_cluster.py; skipped where Slurm is not installed).

- ``submit.py train --wait`` ends with a ``last.pt`` bitwise equal to a direct ``train_at.py`` run;
- two of Slurm's time-limit warnings (USR2, the signal ``--signal`` asks for) mid-run: the job saves
  at a step boundary, requeues itself twice and ends bitwise equal to the uninterrupted run;
- a 2-task job (gloo, 1 CPU each) equals ``torchrun --nproc_per_node 2``, for training and evaluation;
- a 2x2 grid x 2 seeds sweep with evaluations: one run folder per point and seed, the manifest,
  evaluations after their training; one evaluation pre-empted mid-way (``scontrol requeue``: SIGTERM,
  then Slurm requeues it) ends with the same ``per_sample.csv`` as an uninterrupted evaluation;
  submitting the sweep again submits nothing;
- an unknown partition: one line, exit 2, nothing queued and no folder made.

The job to signal is frozen (SIGSTOP) the moment it has made progress, so the signal lands mid-run
on any machine; the test then checks from the job's own log that it did. Slurm delays a requeued
job by two minutes; the tests move its start to now (``scontrol update StartTime=now``).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

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


def run(slurm, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([PY, *argv], cwd=ROOT, env=env(slurm), capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{argv[0]} exited with {out.returncode}:\n{out.stdout}\n{out.stderr}")
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


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, by ``train_at.py`` itself."""
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run([PY, "train_at.py", *TRAIN, "--out", str(out)], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    return out


def test_a_train_job_equals_a_direct_run(slurm, reference, tmp_path):
    out = run(slurm, "submit.py", "train", "--wait", "--", *TRAIN, "--out", str(tmp_path / "run"))
    assert "COMPLETED" in out.stdout
    assert_same_checkpoint(tmp_path / "run", reference)
    [job] = rows(tmp_path / "run" / "jobs.csv")
    assert (job["kind"], job["dir"], job["state"], job["executor"]) == ("train", ".", "COMPLETED", "slurm")
    assert Path(job["stdout"]).is_file() and Path(job["stderr"]).is_file()
    [alloc] = rows(tmp_path / "run" / "allocations.csv")
    assert (alloc["job_id"], alloc["allocation"], alloc["outcome"]) == (job["job_id"], "1", "finished")


def test_time_limit_warnings_requeue_the_run_to_an_exact_finish(slurm, reference, tmp_path):
    run_dir = tmp_path / "run"
    [job] = job_ids(run(slurm, "submit.py", "train", "--signal-delay", "60", "--", *TRAIN, "--out",
                        str(run_dir)).stdout, "train")
    log = run_dir / "log.csv"
    for allocation, epochs_logged in ((1, 1), (2, 2)):
        wait_until(f"epoch {epochs_logged} in allocation {allocation}",
                   lambda: len(rows(run_dir / "allocations.csv")) == allocation and len(rows(log)) >= epochs_logged)
        pids = freeze(slurm, job)
        slurm.run("scancel", "--signal=USR2", job, check=True)  # what Slurm sends --signal-delay s before the limit
        thaw(pids)
        release(slurm, job)
    assert wait_ended(slurm, [job]) == {job: "COMPLETED"}
    allocations = rows(run_dir / "allocations.csv")
    assert [a["outcome"] for a in allocations] == ["time limit: saved and requeued"] * 2 + ["finished"]
    assert [a["allocation"] for a in allocations] == ["1", "2", "3"] and {a["job_id"] for a in allocations} == {job}
    stops = [int(s) for s in re.findall(r"stopped by SIGUSR2 at global step (\d+)",
                                        (run_dir / "jobs" / f"{job}_0_log.err").read_text())]
    assert len(stops) == 2 and 0 < stops[0] < stops[1] < 2 * EPOCHS, stops  # both mid-run, the second later
    assert_same_checkpoint(run_dir, reference)


def test_past_max_requeues_a_job_stops_with_its_checkpoint(slurm, tmp_path):
    run_dir = tmp_path / "run"
    argv = [PY, "submit.py", "train", "--max-requeues", "0", "--wait", "--", *TRAIN, "--out", str(run_dir)]
    waiting = subprocess.Popen(argv, cwd=ROOT, env=env(slurm), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    job = wait_until("the job id", lambda: rows(run_dir / "jobs.csv"))[0]["job_id"]
    wait_until("the first epoch", lambda: rows(run_dir / "allocations.csv") and len(rows(run_dir / "log.csv")) >= 1)
    pids = freeze(slurm, job)
    slurm.run("scancel", "--signal=USR2", job, check=True)
    thaw(pids)
    out, _ = waiting.communicate(timeout=600)
    assert waiting.returncode == 1 and f"train job {job} ({run_dir}): FAILED" in out, out
    [alloc] = rows(run_dir / "allocations.csv")
    assert alloc["outcome"].startswith("time limit: not requeued, --max-requeues 0 reached")
    assert f"-- --resume {run_dir}" in alloc["outcome"]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["global_step"] < 2 * EPOCHS  # saved where it stopped
    assert rows(run_dir / "jobs.csv")[0]["state"] == "FAILED"


def test_a_two_task_job_equals_torchrun(slurm, tmp_path):
    train = train_args(epochs=2)
    two = ["--tasks-per-node", "2", "--cpus-per-task", "1", "--wait"]
    run(slurm, "submit.py", "train", *two, "--", *train, "--out", str(tmp_path / "slurm"))
    run(slurm, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_at.py", *train,
        "--out", str(tmp_path / "torchrun"))
    assert_same_checkpoint(tmp_path / "slurm", tmp_path / "torchrun")
    assert torch.load(tmp_path / "slurm" / "checkpoints" / "last.pt", weights_only=True)["world_size"] == 2
    run(slurm, "submit.py", "eval", *two, "--", str(tmp_path / "slurm"), *EVAL)
    run(slurm, "-m", "torch.distributed.run", "--nproc_per_node", "2", "eval_autoattack.py", str(tmp_path / "slurm"),
        *EVAL, "--out", str(tmp_path / "eval_torchrun"))
    by_slurm = (tmp_path / "slurm" / "eval" / "per_sample.csv").read_bytes()
    assert by_slurm == (tmp_path / "eval_torchrun" / "per_sample.csv").read_bytes()
    report = json.loads((tmp_path / "slurm" / "eval" / "report.json").read_text())
    assert report["environment"]["processes"] == 2


GRID = ["--grid", "alpha=10,20", "--grid", "beta=3,4", "--seeds", "0", "1"]
SWEEP_TRAIN = train_args(epochs=1, seed=False)  # the seeds come from --seeds
POINTS = [(alpha, beta, seed) for alpha in (10, 20) for beta in (3, 4) for seed in (0, 1)]
DIRS = [f"alpha={a},beta={b}/seed{s}" for a, b, s in POINTS]
PREEMPTED = "alpha=20,beta=4/seed1"


@pytest.fixture(scope="module")
def sweep(slurm, tmp_path_factory) -> dict:
    """The sweep, its last run's evaluation pre-empted once mid-way; returns what the tests check."""
    folder = tmp_path_factory.mktemp("sweep") / "abl"
    argv = ["submit.py", "sweep", *GRID, "--out", str(folder), "--eval-args", " ".join(EVAL), "--cpus-per-task", "1",
            "--", *SWEEP_TRAIN]
    out = run(slurm, *argv).stdout
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
    for d, (alpha, beta, seed) in zip(DIRS, POINTS):
        config = yaml.safe_load((folder / d / "config.yaml").read_text())
        assert (config["alpha"], config["beta"], config["seed"]) == (alpha, beta, seed)
        assert (folder / d / "eval" / "per_sample.csv").is_file()
        eval_start = rows(folder / d / "eval" / "allocations.csv")[0]["start"]
        assert eval_start >= rows(folder / d / "allocations.csv")[-1]["end"]  # after its training ended


def test_a_preempted_sweep_evaluation_equals_an_uninterrupted_one(sweep, tmp_path):
    import eval_autoattack

    assert 0 < sweep["chunks_done"] < N_CHUNK_RESULTS  # pre-empted mid-way
    allocations = rows(sweep["folder"] / PREEMPTED / "eval" / "allocations.csv")
    assert [a["outcome"].split(" (")[0] for a in allocations] == ["stopped by SIGTERM", "finished"]
    assert eval_autoattack.main([str(sweep["folder"] / PREEMPTED), *EVAL, "--out", str(tmp_path / "eval")]) == 0
    resumed = (sweep["folder"] / PREEMPTED / "eval" / "per_sample.csv").read_bytes()
    assert resumed == (tmp_path / "eval" / "per_sample.csv").read_bytes()


def test_submitting_the_sweep_again_submits_nothing(slurm, sweep):
    before = rows(sweep["folder"] / "jobs.csv")
    out = run(slurm, *sweep["argv"]).stdout
    assert not job_ids(out, "train") and not job_ids(out, "eval") and "nothing to submit" in out
    assert rows(sweep["folder"] / "jobs.csv") == before
    assert out.count("finished and evaluated") == 8


def test_an_unknown_partition_submits_nothing(slurm, tmp_path, capsys, monkeypatch):
    from cluster.cli import main

    monkeypatch.setenv("SLURM_CONF", slurm.env()["SLURM_CONF"])
    code = main(["train", "--partition", "nosuchpartition", "--", *TRAIN, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "partition" in err[0], err
    assert not (tmp_path / "run").exists()
    assert slurm.run("squeue", "-h", "-o", "%i").stdout.strip() == ""
