"""Runs survive SIGKILL, SIGTERM/SIGINT, NaN, a full disk and hostile checkpoints, and resume exactly.

The subprocess tests run ``train_at.py`` on a quickstart-sized job (digits, small-cnn, GKL + AWP +
averaging, 4 epochs of 4 steps) and compare the final checkpoint bit for bit with an uninterrupted
run made in this process (both single-threaded on the CPU, so the arithmetic is identical).
"""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

import train_at
from checkpoints.io import CheckpointUnreadable, UnsafeCheckpoint, load_checkpoint, save_checkpoint
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "quickstart", "--awp-warmup", "2", "--avg-start-epoch", "2", "--val-size", "1309",
        "--eval-subset", "32", "--eval-pgd-steps", "2", "--batch-size", "32", "--attack-budget", "fixed",
        "--attack-steps", "2", "--attack-step-size", "8/255", "--no-progress"]
RUN_ARGS = TINY + ["--epochs", "4", "--checkpoint-every-steps", "1"]
STEPS_PER_EPOCH = (1437 - 1309) // 32
TOTAL_STEPS = 4 * STEPS_PER_EPOCH
WAIT_S = 600  # generous: other jobs may share the two cores


# ------------------------------------------------------------------------------------------- helpers
def _child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, str(ROOT / "train_at.py"), *argv], cwd=ROOT, env=_child_env(),
                                stdout=f, stderr=subprocess.STDOUT)


def _stamp(path: Path):
    """Changes with every completed save: each one renames a new file over ``path``."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _wait_for_save(proc: subprocess.Popen, last: Path, before, log: Path) -> float:
    """Block until ``proc`` has renamed a new ``last.pt`` into place; returns the time it was seen."""
    deadline = time.monotonic() + WAIT_S
    while _stamp(last) == before:
        assert proc.poll() is None, f"run exited with {proc.returncode} before saving:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint written in time"
        time.sleep(0.005)
    return time.monotonic()


def _temp_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.rglob(".*") if p.is_file())


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert (a["epoch"], a["step_in_epoch"], a["global_step"]) == (b["epoch"], b["step_in_epoch"], b["global_step"])
    for key in ("model", "avg_model"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"]), i
    for k in ("accumulator", "counts"):
        assert torch.equal(a["bank"][k], b["bank"][k]), k
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


def _last(run: Path) -> Path:
    return run / "checkpoints" / "last.pt"


@contextlib.contextmanager
def _child(argv: list[str], log: Path) -> Iterator[subprocess.Popen]:
    proc = _start(argv, log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The final checkpoint of an uninterrupted run made in this process."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train_at.main(RUN_ARGS + ["--out", str(run)]) == 0
    return load_checkpoint(_last(run))


# ------------------------------------------------------------------------------------------- kills
def test_sigkill_at_five_random_points_then_resume_is_bitwise_exact(reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "child.log"
    rng = random.Random(20240909)
    last, killed_at, interval = _last(run), [], None
    for i in range(5):
        argv = ["--resume", str(run), "--no-progress"] if last.exists() else RUN_ARGS + ["--out", str(run)]
        before = _stamp(last)
        with _child(argv, log) as proc:
            seen = _wait_for_save(proc, last, before, log)
            if interval is None:  # this machine's time between two saves (one training step), measured once
                interval = _wait_for_save(proc, last, _stamp(last), log) - seen
            time.sleep(rng.uniform(0.0, interval))  # anywhere in the step: attack, update, evaluation or save
            proc.kill()
            assert proc.wait() == -signal.SIGKILL, f"kill {i} came after the run ended:\n{log.read_text()[-2000:]}"
        state = load_checkpoint(last)  # a complete checkpoint is always there
        killed_at.append(state["global_step"])
    assert killed_at == sorted(set(killed_at)) and killed_at[-1] < TOTAL_STEPS, killed_at
    assert train_at.main(["--resume", str(run), "--no-progress"]) == 0
    assert _temp_files(run) == []  # leftovers of killed writes are gone after the resume
    _assert_same_training_state(reference, load_checkpoint(last))


def test_sigterm_saves_at_the_step_boundary_exits_143_and_resumes_exactly(reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "child.log"
    with _child(RUN_ARGS + ["--out", str(run)], log) as proc:
        _wait_for_save(proc, _last(run), None, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S) == 128 + signal.SIGTERM, log.read_text()[-2000:]
    out = log.read_text()
    assert "Traceback" not in out and "stopped by SIGTERM at global step" in out
    step = int(out.split("stopped by SIGTERM at global step ")[1].split(";")[0])
    saved = load_checkpoint(_last(run))
    assert saved["global_step"] == step and 1 <= step < TOTAL_STEPS
    assert saved["step_in_epoch"] == step - STEPS_PER_EPOCH * saved["epoch"]
    assert train_at.main(["--resume", str(run), "--no-progress"]) == 0
    _assert_same_training_state(reference, load_checkpoint(_last(run)))


def _signal_at_step(monkeypatch, steps_to_signal: dict[int, int]) -> None:
    """Deliver real signals to this process from inside given training steps (global step, 1-based)."""
    original = Trainer.training_step

    def step(self, *a, **k):
        out = original(self, *a, **k)
        if self.global_step in steps_to_signal:
            os.kill(os.getpid(), steps_to_signal[self.global_step])
        return out

    monkeypatch.setattr(Trainer, "training_step", step)


def test_sigint_saves_the_current_step_and_a_second_signal_stops_at_once(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = TINY + ["--epochs", "1", "--checkpoint-every-steps", "2", "--out", str(run)]
    _signal_at_step(monkeypatch, {3: signal.SIGINT})
    assert train_at.main(argv) == 128 + signal.SIGINT
    assert load_checkpoint(_last(run))["global_step"] == 3  # saved at the end of the signalled step
    assert "stopped by SIGINT at global step 3" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    # a second signal arriving while the first one's checkpoint is being saved stops at once:
    # nothing new is saved, the step-3 checkpoint stays
    before = _last(run).read_bytes()
    _signal_at_step(monkeypatch, {4: signal.SIGTERM})
    original_save = Trainer.save

    def save_after_second_signal(self, **kw):
        if self._stop_signal is not None:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_save(self, **kw)

    monkeypatch.setattr(Trainer, "save", save_after_second_signal)
    assert train_at.main(["--resume", str(run), "--no-progress"]) == 128 + signal.SIGTERM
    assert "stopped at once by SIGTERM" in capsys.readouterr().err
    assert _last(run).read_bytes() == before and _temp_files(run) == []


# ------------------------------------------------------------------------------------------- NaN
def test_nan_loss_stops_the_run_naming_step_and_part_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    import training.engine as engine_module

    run = tmp_path / "run"
    saved: dict[str, bytes] = {}
    calls = {"n": 0}
    original_loss = engine_module.training_loss

    def loss_hook(spec, net, *a, **k):  # one call per step: AWP is off in epoch 1
        loss, parts, o_nat, o_adv = original_loss(spec, net, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # global step 3; it is only checked at the step-4 checkpoint
            saved["bytes"] = _last(run).read_bytes()  # the step-2 checkpoint
            parts = dict(parts, soft_ce=parts["soft_ce"] * float("nan"))
            loss = loss * float("nan")
        return loss, parts, o_nat, o_adv

    monkeypatch.setattr(engine_module, "training_loss", loss_hook)
    argv = TINY + ["--epochs", "1", "--checkpoint-every-steps", "2", "--out", str(run)]
    assert train_at.main(argv) == train_at.EXIT_DIVERGED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "non-finite loss, soft_ce at global step 3 (epoch 1)" in err and "is kept" in err, err
    assert _last(run).read_bytes() == saved["bytes"]
    assert load_checkpoint(_last(run))["global_step"] == 2


def test_nonfinite_weights_stop_the_run_before_they_are_saved(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    saved: dict[str, bytes] = {}
    original = Trainer.training_step

    def step(self, *a, **k):
        out = original(self, *a, **k)
        if self.global_step == 4:  # the update of the step that saves next went wrong (the loss was finite)
            saved["bytes"] = _last(run).read_bytes()
            with torch.no_grad():
                next(self.model.parameters())[0].fill_(float("inf"))
        return out

    monkeypatch.setattr(Trainer, "training_step", step)
    argv = TINY + ["--epochs", "1", "--checkpoint-every-steps", "2", "--out", str(run)]
    assert train_at.main(argv) == train_at.EXIT_DIVERGED
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite weights at or before global step 4 (epoch 1)" in err, err
    assert _last(run).read_bytes() == saved["bytes"]
    assert load_checkpoint(_last(run))["global_step"] == 2


# ------------------------------------------------------------------------------------------- disk
class _FillsUp:
    """A file whose device runs out of space after ``room`` bytes."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_on_save_fails_cleanly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import checkpoints.io as io_module

    run = tmp_path / "run"
    real_save, calls, saved = torch.save, {"n": 0}, {}

    def filling_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] < 2:
            return real_save(obj, f, *a, **k)
        saved["bytes"] = _last(run).read_bytes()
        return real_save(obj, _FillsUp(f, room=100_000), *a, **k)

    monkeypatch.setattr(io_module.torch, "save", filling_save)
    argv = TINY + ["--epochs", "1", "--checkpoint-every-steps", "1", "--out", str(run)]
    assert train_at.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and str(_last(run)) in err, err
    assert _last(run).read_bytes() == saved["bytes"]
    assert _temp_files(run) == []  # the partial temp file was removed


def test_interrupted_write_leaves_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    import checkpoints.io as io_module

    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.ones(3)}, path)
    before = path.read_bytes()

    def dies_half_way(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(io_module.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint({"w": torch.ones(1)}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def finished_template(tmp_path_factory) -> Path:
    """A 2-epoch run folder (2 steps per epoch; epoch checkpoints 1 and 2, last = epoch 2)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train_at.main(TINY + ["--epochs", "2", "--val-size", "1373", "--out", str(run)]) == 0
    return run


@pytest.fixture
def finished_run(finished_template, tmp_path) -> Path:
    return Path(shutil.copytree(finished_template, tmp_path / "run"))


def _config(run: Path):
    from training.config import TrainConfig, load_yaml

    return TrainConfig.from_dict(load_yaml(run / "config.yaml")).validate()


def test_resume_skips_truncated_files_and_removes_temp_leftovers(finished_run, capsys):
    folder = finished_run / "checkpoints"
    full = (folder / "last.pt").read_bytes()
    (folder / ".last.pt.0badf00d.tmp").write_bytes(full[: len(full) // 2])  # a write killed half-way
    (folder / ".epoch_0002.pt.link").write_bytes(b"")
    (finished_run / ".log.csv.tmp").write_text("epoch\n")
    # last.pt itself damaged (a copy cut short): the newest complete epoch checkpoint is used
    (folder / "last.pt").write_bytes(full[:1000])
    (folder / "epoch_0002.pt").write_bytes(full[:-10])
    capsys.readouterr()
    trainer = Trainer(_config(finished_run), finished_run, resume=True, progress=False)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert (trainer.epoch, trainer.global_step) == (1, 2)
    assert "resuming from epoch_0001.pt" in text and "cannot read checkpoint" in text, text
    assert _temp_files(finished_run) == []


def _truncate_in_place(path: Path) -> None:
    with open(path, "r+b") as f:  # the same inode: what a damaged disk or a half-failed copy-back does
        f.truncate(1000)


def _random_bytes_in_place(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(random.Random(5).randbytes(path.stat().st_size))


@pytest.mark.parametrize("damage", [_truncate_in_place, _random_bytes_in_place], ids=["truncated", "random-bytes"])
def test_a_damaged_last_pt_never_damages_the_fallbacks_and_resume_ends_bitwise_equal(
        damage, finished_template, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    folder = run / "checkpoints"
    original = Trainer.save

    def save_then_damage(self, **kw):
        original(self, **kw)
        if kw.get("epoch_end") and self.epoch == 1:
            damage(folder / "last.pt")
            raise KeyboardInterrupt  # the run dies right after the damage, like a crash

    monkeypatch.setattr(Trainer, "save", save_then_damage)
    argv = TINY + ["--epochs", "2", "--val-size", "1373", "--out", str(run)]  # as finished_template was made
    assert train_at.main(argv) == 130
    monkeypatch.setattr(Trainer, "save", original)
    for name in ("epoch_0001.pt", "best.pt"):  # independent files: intact
        assert load_checkpoint(folder / name)["global_step"] == 2, name
    capsys.readouterr()
    assert train_at.main(["--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err  # notes go through tqdm.write
    assert "note: " in text and "resuming from epoch_0001.pt" in text and "could run code" not in text, text
    _assert_same_training_state(load_checkpoint(_last(finished_template)), load_checkpoint(_last(run)))
    for name in ("epoch_0002.pt", "best.pt"):
        assert os.stat(folder / name).st_ino != os.stat(folder / "last.pt").st_ino


def test_resume_of_a_finished_run_says_so_and_touches_nothing(finished_run, monkeypatch, capsys):
    def stamp(folder: Path) -> dict:
        return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
                if p.is_file()}

    monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("a finished run was rebuilt"))
    before = stamp(finished_run)
    time.sleep(0.01)  # a rewrite would show in the mtimes
    assert train_at.main(["--resume", str(finished_run), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().startswith(f"{finished_run}: finished at epoch 2, nothing to do"), out
    assert out.err == ""
    assert stamp(finished_run) == before


def test_load_checkpoint_tells_not_a_checkpoint_from_code_that_would_run(tmp_path):
    import fractions

    cases = {"random.pt": random.Random(0).randbytes(5000), "config.yaml": b"arch: small-cnn\nepochs: 3\n",
             "empty.pt": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointUnreadable) as e:
            load_checkpoint(tmp_path / name)
        assert ("is empty, not a checkpoint" if not data else "is not a checkpoint") in str(e.value), str(e.value)
    for obj, name in ((fractions.Fraction(1, 3), "fractions.Fraction"), (os.system, "posix.system")):
        torch.save({"model": {"w": torch.ones(1)}, "x": obj}, tmp_path / "asks.pt")
        with pytest.raises(UnsafeCheckpoint) as e:
            load_checkpoint(tmp_path / "asks.pt")
        assert f"asks for the pickled global {name}, which could run code" in str(e.value), str(e.value)


def test_overwrite_removes_the_earlier_runs_files(finished_run, capsys):
    import pandas as pd

    folder = finished_run / "checkpoints"
    shutil.copy(folder / "epoch_0002.pt", folder / "epoch_0050.pt")  # an older, longer run's checkpoint
    (finished_run / "eval").mkdir()
    (finished_run / "eval" / "report.md").write_text("old model\n")
    assert train_at.main(TINY + ["--epochs", "1", "--val-size", "1373", "--out", str(finished_run),
                                 "--overwrite"]) == 0
    assert "--overwrite: removed" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "epoch_0001.pt", "last.pt"]
    assert not (finished_run / "eval").exists()
    assert pd.read_csv(finished_run / "log.csv").epoch.tolist() == [1]
    # the stale epoch file is gone, so a resume with a damaged last.pt cannot fall back to it
    (folder / "last.pt").write_bytes(b"")
    trainer = Trainer(_config(finished_run), finished_run, resume=True, progress=False)
    assert trainer.epoch == 1


def test_truncated_checkpoints_are_refused_with_one_line(tmp_path):
    good = save_checkpoint({"model": {"w": torch.randn(64, 64)}, "step": 3}, tmp_path / "good.pt").read_bytes()
    for cut in (0, 10, 100, len(good) // 2, len(good) - 30, len(good) - 1):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(good[:cut])
        with pytest.raises(CheckpointUnreadable) as e:
            load_checkpoint(bad)
        assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_resume_refuses_a_checkpoint_of_another_architecture(finished_run, capsys):
    last = _last(finished_run)
    state = load_checkpoint(finished_run / "checkpoints" / "epoch_0001.pt")  # unfinished: there is work to do
    run_arch = state["config"]["arch"]
    state["arch"] = "wrn-28-10"
    save_checkpoint(state, last)
    before = last.read_bytes()
    assert train_at.main(["--resume", str(finished_run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wrn-28-10" in err and run_arch in err, err
    assert last.read_bytes() == before


# ------------------------------------------------------------------------------------------- pickles
class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: proof that code in a checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_checkpoint_that_would_run_code_is_refused_and_never_runs(writer, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    payload = {"format": "gkl-at/1", "model": {"w": torch.ones(1)}, "hook": RunsCode(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpoint) as e:
        load_checkpoint(path)
    msg = str(e.value)
    # named as torch (torch.save) or pickletools (a raw pickle) reads it: open is io.open
    assert "\n" not in msg and "\x1b" not in msg and str(path) in msg and "pickled global io.open" in msg, msg
    assert not marker.exists()


def test_resume_from_a_checkpoint_that_would_run_code_exits_2(finished_run, tmp_path, capsys):
    marker = tmp_path / "code_ran"
    state = load_checkpoint(_last(finished_run))
    state["hook"] = RunsCode(marker)
    torch.save(state, _last(finished_run))
    assert train_at.main(["--resume", str(finished_run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to load" in err, err
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- issue 22
def _digits_checkpoint(path: Path) -> Path:
    """A project checkpoint of an untrained small-cnn on digits (enough to evaluate)."""
    from test_one_writer import _small_checkpoint

    return _small_checkpoint(path)


def test_a_lock_file_that_is_a_link_a_fifo_or_a_hard_link_is_refused_and_nothing_is_written_through_it(tmp_path):
    from core.files import LOCK_NAME, folder_lock
    from errors import UserError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    plants = {"link": lambda p: p.symlink_to(victim), "fifo": os.mkfifo, "hard link": lambda p: os.link(victim, p)}
    for name, plant in plants.items():
        folder = tmp_path / name
        folder.mkdir()
        plant(folder / LOCK_NAME)
        for shared in (False, True):
            with pytest.raises(UserError) as e:
                with folder_lock(folder, str, shared=shared):
                    pytest.fail("locked through a planted file")
            assert "\n" not in str(e.value) and f"{folder / LOCK_NAME} is " in str(e.value), str(e.value)
        assert victim.read_text() == "precious\n", name
        assert os.path.lexists(folder / LOCK_NAME)  # left for the user to look at, as the message says


def test_a_full_disk_at_the_evaluation_lock_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch, capsys):
    import core.files
    import eval_autoattack

    model, out = _digits_checkpoint(tmp_path / "model.pt"), tmp_path / "eval"
    argv = [str(model), "--attacks", "clean", "--n-ex", "8", "--out", str(out), "--quiet"]

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(core.files.os, "pwrite", no_space)  # the lock file's PID: the first bytes it writes
    assert eval_autoattack.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write the lock file {out / '.lock'}: No space left on device (free some space or " \
                  "fix the folder's permissions, or choose another --out)", err
    assert sorted(p.name for p in out.iterdir()) == []  # no stale lock, no probe
    monkeypatch.undo()
    import checkpoints.run_folder as run_folder

    monkeypatch.setattr(run_folder.os, "write", no_space)  # the write probe before it
    assert eval_autoattack.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot write to output folder {out}: No space left on device" in err, err
    assert sorted(p.name for p in out.iterdir()) == []


def test_overwrite_removes_a_linked_eval_folder_but_not_what_it_points_to(tmp_path):
    from checkpoints.run_folder import clear_previous_run

    run, elsewhere = tmp_path / "run", tmp_path / "scratch" / "eval"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"old")
    (run / "log.csv").write_text("epoch\n1\n")
    elsewhere.mkdir(parents=True)
    (elsewhere / "report.md").write_text("old model\n")
    (run / "eval").symlink_to(elsewhere, target_is_directory=True)
    assert len(clear_previous_run(run)) == 3
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["report.md"]  # the link's target is not the run's


def test_a_damaged_cached_chunk_is_computed_again_on_resume_with_a_note(tmp_path, capsys):
    import eval_autoattack

    model, out = _digits_checkpoint(tmp_path / "model.pt"), tmp_path / "eval"
    argv = [str(model), "--attacks", "pgd3", "aa:apgd-ce", "--eps", "8", "--n-ex", "16", "--chunk-size", "8",
            "--out", str(out), "--quiet"]
    assert eval_autoattack.main(argv) == 0
    first = (out / "per_sample.csv").read_bytes()
    chunks = sorted((out / "cache").glob("pgd3_*_c00001_*.pt"))
    assert len(chunks) == 1
    chunks[0].write_bytes(chunks[0].read_bytes()[:100])  # cut short, as a full disk or a bad copy leaves it
    capsys.readouterr()
    assert eval_autoattack.main(argv + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert f"note: cannot read checkpoint {chunks[0]}" in err and "its results are computed again" in err, err
    assert (out / "per_sample.csv").read_bytes() == first
    assert load_checkpoint(chunks[0])["robust"].numel() == 8  # rewritten whole


def test_an_unreadable_checkpoint_is_not_called_empty(tmp_path, monkeypatch):
    path = save_checkpoint({"w": torch.ones(1)}, tmp_path / "last.pt")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(torch, "load", denied)  # root reads any file, so the refusal is faked
    with pytest.raises(CheckpointUnreadable) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"cannot read {path}: Permission denied") and "empty" not in str(e.value)


def _handles_sigterm(pid: int) -> bool:
    """Whether ``pid`` has a handler for SIGTERM (the scripts install one before their slow imports)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.parametrize("when", ["starting", "training"])
def test_a_second_sigint_50_ms_after_the_first_still_ends_in_one_line(when, tmp_path):
    run, log = tmp_path / "run", tmp_path / "child.log"
    with _child(TINY + ["--epochs", "2", "--checkpoint-every-steps", "1", "--out", str(run)], log) as proc:
        deadline = time.monotonic() + WAIT_S
        while not _handles_sigterm(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.005)
        if when == "training":
            _wait_for_save(proc, _last(run), None, log)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT_S) == 128 + signal.SIGINT, log.read_text()[-2000:]
    lines = [ln for ln in log.read_text().splitlines() if ln.strip() and not ln.startswith(("epoch", "signal 2:"))]
    expected = "interrupted before training started" if when == "starting" else "stopped "
    assert len(lines) == 1 and lines[0].startswith(expected), lines
