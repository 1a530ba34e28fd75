"""One writer per run folder and per evaluation folder, shown with real processes.

A trainer (rank 0) holds an exclusive ``flock`` on ``RUN/.lock`` for the whole run, an evaluation on
``OUT/.lock``; a second process on the same folder exits 2 naming the holder's PID and changes
nothing; the OS drops the lock of a SIGKILLed process, so such a run resumes at once.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval_autoattack
import train_at
from checkpoints.io import load_checkpoint, save_checkpoint
from core.files import LOCK_NAME, FolderInUse, folder_lock

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "quickstart", "--awp-warmup", "2", "--avg-start-epoch", "2", "--val-size", "1309",
        "--eval-subset", "32", "--eval-pgd-steps", "2", "--batch-size", "32", "--attack-budget", "fixed",
        "--attack-steps", "2", "--attack-step-size", "8/255", "--no-progress"]
WAIT_S = 600  # generous: other jobs may share the two cores


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(script: str, argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, str(ROOT / script), *argv], cwd=ROOT, env=_env(), stdout=f,
                                stderr=subprocess.STDOUT)


def _wait_until_locked(proc: subprocess.Popen, folder: Path, log: Path) -> None:
    """Until ``proc`` holds ``folder``'s lock (its PID is in the lock file)."""
    deadline = time.monotonic() + WAIT_S
    lock = folder / LOCK_NAME
    while not (lock.is_file() and lock.read_text().strip() == str(proc.pid)):
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the lock was not taken in time"
        time.sleep(0.01)


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _stop_and_kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()  # also ends a SIGSTOPped process
    proc.wait()


def _one_error(capsys) -> str:
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.err + out.out, out.err
    return lines[0]


def test_a_running_run_refuses_resume_and_a_second_trainer_and_a_sigkill_frees_it(tmp_path, capsys):
    run, log = tmp_path / "run", tmp_path / "child.log"
    proc = _start("train_at.py", TINY + ["--epochs", "2", "--checkpoint-every-steps", "1", "--out", str(run)], log)
    try:
        _wait_until_locked(proc, run, log)
        deadline = time.monotonic() + WAIT_S
        while not (run / "checkpoints" / "last.pt").is_file():  # something to resume, even with a damaged last.pt
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)  # frozen while holding the lock: the folder cannot change under us
        before = _tree(run)
        assert train_at.main(["--resume", str(run), "--no-progress"]) == 2
        line = _one_error(capsys)
        assert f"process {proc.pid}" in line and "still going" in line, line
        assert train_at.main(TINY + ["--epochs", "1", "--out", str(run)]) == 2
        line = _one_error(capsys)  # the running PID, not "continue it with --resume"
        assert f"process {proc.pid}" in line and "in use by another training run" in line, line
        # --overwrite passes that check and would delete the running run's files: the lock stops it
        assert train_at.main(TINY + ["--epochs", "1", "--out", str(run), "--overwrite"]) == 2
        line = _one_error(capsys)
        assert f"process {proc.pid}" in line and "in use by another training run" in line, line
        assert _tree(run) == before
        proc.kill()  # SIGKILL: the OS drops the lock; the stale lock file stays
        proc.wait()
    finally:
        _stop_and_kill(proc)
    assert (run / LOCK_NAME).is_file()
    assert train_at.main(["--resume", str(run), "--no-progress"]) == 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (2, 0)
    assert not (run / LOCK_NAME).exists()  # removed by the process that held it last


@pytest.mark.slow
def test_two_trainers_started_together_leave_one_consistent_run(tmp_path):
    run = tmp_path / "run"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start("train_at.py", TINY + ["--epochs", "2", "--seed", str(seed), "--out", str(run)], log)
             for seed, log in zip((1, 2), logs)]
    try:
        codes = [p.wait(timeout=WAIT_S) for p in procs]
    finally:
        for p in procs:
            _stop_and_kill(p)
    assert sorted(codes) == [0, 2], [log.read_text()[-2000:] for log in logs]
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    err = [ln for ln in logs[loser].read_text().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    # the loser either met the winner's lock or, having started late, its finished checkpoints
    assert f"process {procs[winner].pid}" in err[0] or "already holds a run" in err[0], err[0]
    from training.config import load_yaml

    seed = load_yaml(run / "config.yaml")["seed"]
    assert seed == (1, 2)[winner] == load_checkpoint(run / "checkpoints" / "last.pt")["config"]["seed"]
    for name in ("epoch_0002.pt", "best.pt"):
        assert load_checkpoint(run / "checkpoints" / name)["config"]["seed"] == seed
    import pandas as pd

    assert pd.read_csv(run / "log.csv").epoch.tolist() == [1, 2]


def _small_checkpoint(path: Path) -> Path:
    from models import build_model
    from training.config import TrainConfig

    torch.manual_seed(0)
    sd = build_model("small-cnn", num_classes=10).state_dict()
    return save_checkpoint({"format": "gkl-at/1", "model": sd, "avg_model": None, "arch": "small-cnn",
                            "num_classes": 10, "dataset": "digits", "config": TrainConfig(dataset="digits").to_dict(),
                            "epoch": 1, "global_step": 1}, path)


def test_two_evaluations_into_one_folder(tmp_path, capsys):
    model, out, log = _small_checkpoint(tmp_path / "model.pt"), tmp_path / "eval", tmp_path / "child.log"
    argv = [str(model), "--attacks", "clean", "pgd20", "--eps", "8", "--n-ex", "64", "--out", str(out)]
    proc = _start("eval_autoattack.py", [*argv, "--quiet"], log)
    try:
        _wait_until_locked(proc, out, log)
        proc.send_signal(signal.SIGSTOP)
        before = _tree(tmp_path)
        assert eval_autoattack.main([*argv, "--quiet"]) == 2
        line = _one_error(capsys)
        assert f"process {proc.pid}" in line and "in use by another evaluation" in line, line
        assert _tree(tmp_path) == before
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-2000:]
    finally:
        _stop_and_kill(proc)
    assert (out / "report.json").is_file() and not (out / LOCK_NAME).exists()


def test_the_lock_is_per_folder_and_released_on_errors(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with folder_lock(a, lambda pid: f"busy {pid}") as lock:
        assert lock == a / LOCK_NAME and lock.read_text().strip() == str(os.getpid())
        with folder_lock(b, lambda pid: f"busy {pid}"):  # another folder: independent
            with pytest.raises(FolderInUse) as e:  # a second holder, even in this process (flock is per open file)
                with folder_lock(a, lambda pid: f"busy {pid}"):
                    pass
            assert e.value.pid == os.getpid() and str(e.value) == f"busy {os.getpid()}"
    with pytest.raises(RuntimeError):
        with folder_lock(a, str):
            raise RuntimeError("the block failed")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]  # lock files removed with the locks
    with folder_lock(a, str):  # and free again
        pass


# ------------------------------------------------------------------------------------------- issue 22
def test_overwrite_waits_for_the_evaluation_and_no_report_is_written_for_a_replaced_checkpoint(tmp_path, capsys):
    run, log = tmp_path / "run", tmp_path / "child.log"
    last = _small_checkpoint(run / "checkpoints" / "last.pt")
    proc = _start("eval_autoattack.py", [str(run), "--attacks", "clean", "pgd20", "--eps", "8", "--n-ex", "64",
                                         "--chunk-size", "16", "--quiet"], log)
    try:
        _wait_until_locked(proc, run / "eval", log)
        proc.send_signal(signal.SIGSTOP)
        before = _tree(run)
        assert train_at.main(TINY + ["--epochs", "1", "--out", str(run), "--overwrite"]) == 2
        line = _one_error(capsys)
        assert line.startswith(f"error: --overwrite {run}:") and f"process {proc.pid}" in line, line
        assert _tree(run) == before  # nothing removed under the evaluation
        save_checkpoint(load_checkpoint(last), last)  # a newer last.pt, as a running trainer saves every epoch
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=WAIT_S) == 2, log.read_text()[-2000:]
    finally:
        _stop_and_kill(proc)
    err = [ln for ln in log.read_text().splitlines() if ln.strip() and not ln.startswith("note: ")]
    assert len(err) == 1 and err[0].startswith(f"error: {last} changed while it was evaluated"), err
    assert not (run / "eval" / "report.json").exists() and not (run / "eval" / LOCK_NAME).exists()
    assert len(list((run / "eval" / "cache").glob("pgd20_*_c0000[0-3]_*.pt"))) == 4  # the finished chunks are kept


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes, in some containers, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 30  # liveness bound: they end within milliseconds; orphans would run for minutes
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"orphans still running: {[p for p in pids if _alive(p)]}"
        time.sleep(0.05)


def test_killing_a_torchrun_job_leaves_no_worker_running_and_it_resumes_at_once(tmp_path, capsys):
    model, out, log = _small_checkpoint(tmp_path / "model.pt"), tmp_path / "eval", tmp_path / "torchrun.log"
    # minutes of work per process (PGD-10000 on 180 points), so that orphans would still be running
    argv = [str(model), "--attacks", "clean", "pgd10000", "--eps", "8", "--n-ex", "360", "--chunk-size", "180",
            "--out", str(out), "--quiet"]
    with open(log, "wb") as f:  # a job in a process group of its own, as a shell or a scheduler starts it
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                     "2", str(ROOT / "eval_autoattack.py"), *argv], cwd=tmp_path, env=_env(),
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    workers: list[int] = []
    try:
        _wait_until_written(launcher, out / "cache" / "suite.json", log)  # every process is attacking now
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        os.killpg(launcher.pid, signal.SIGKILL)  # kill -9 -- -PGID: the workers are in sessions of their own
        launcher.wait()
        _wait_gone(workers)
    finally:
        workers += _children(launcher.pid) if launcher.poll() is None else []
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert eval_autoattack.main([str(model), "--out", str(out), "--resume", "--attacks", "clean", "--quiet"]) == 0
    assert "clean" in capsys.readouterr().out and (out / "report.json").is_file()


def _wait_until_written(proc: subprocess.Popen, path: Path, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.is_file():
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} was not written in time"
        time.sleep(0.01)


ARMED_CHILD = """
import sys, time
from core import process
print("started", flush=True)
time.sleep(float(sys.argv[1]))  # the parent may die here, before the signal is armed
assert process.exit_with_parent()
print("armed", flush=True)
time.sleep(600)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("arm_after", [0, 1], ids=["parent-dies-after-arming", "parent-died-before-arming"])
def test_the_parent_death_signal_ends_a_worker_whose_launcher_died(arm_after):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, ARMED_CHILD, str(arm_after)], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == "started"
        if not arm_after:
            assert parent.stdout.readline().strip() == "armed"
        parent.kill()  # as kill -9 of a torchrun launcher
        parent.wait()
        _wait_gone([child])
    finally:
        _stop_and_kill(parent)
        if _alive(child):
            os.kill(child, signal.SIGKILL)
