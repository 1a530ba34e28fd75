"""submit.py without Slurm: bad input, the local executor, and what a (re)submitted sweep plans.

- bad input (malformed --time, --mem, --grid or --slurm-extra, a grid key that is not a config key,
  --executor slurm without Slurm, bad training arguments): one line, exit 2, nothing made;
- ``submit.py train --executor local --wait`` ends bitwise equal to a direct ``train_at.py`` run;
- a sweep folder with a finished-and-evaluated run and a run stopped mid-way: submitting the sweep
  again with one more grid value plans nothing for the first, a resume for the second and both jobs
  for the new point; the manifest keeps the runs in order and unites the values.
(The real-Slurm tests are in test_submit_slurm.py.)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from cluster.submission import refresh_states
from cluster.sweep import Sweep, merge, parse_grid, run_dir_name
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["--preset", "quickstart", "--epochs", "1", "--val-size", str(1437 - 64), "--eval-subset", "8",
         "--eval-pgd-steps", "1", "--no-progress"]


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    out = capsys.readouterr()
    lines = [line for line in out.err.strip().splitlines() if not line.startswith("note: ")]  # notes may precede
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, out)
    return lines[0]


RUN = [*SHORT, "--out", "run"]
ABL = ["--out", "abl"]


@pytest.mark.parametrize("argv, says", [
    (["train", "--time", "1h", "--", *RUN], "--time takes the time limit in whole minutes"),
    (["train", "--time", "0", "--", *RUN], "--time takes the time limit in whole minutes"),
    (["train", "--mem", "lots", "--", *RUN], "--mem 'lots'"),
    (["train", "--slurm-extra", "=5", "--", *RUN], "--slurm-extra '=5'"),
    (["train", "--slurm-extra", "time=5", "--", *RUN], "set by submit.py itself"),
    (["train", "--nodes", "0", "--", *RUN], "--nodes must be at least 1"),
    (["train", "--nodes", "2", "--", *RUN], "--executor local runs on this machine only"),
    (["train", "--"], "give the train_at.py arguments after --"),
    (["train", "--", "--preset", "nosuchpreset"], "nosuchpreset"),
    (["train", "--", *RUN, "--print-config"], "run them with train_at.py directly"),
    (["eval", "--", "nosuchrun", "--attacks", "aa"], "nosuchrun: no such run folder"),
    (["sweep", *ABL, "--grid", "alpha", "--", *SHORT], "--grid 'alpha': write KEY=V1,V2"),
    (["sweep", *ABL, "--grid", "alpha=10,,20", "--", *SHORT], "no empty value"),
    (["sweep", *ABL, "--grid", "learning_rate_x=1,2", "--", *SHORT], "--grid learning_rate_x: not a config key"),
    (["sweep", *ABL, "--grid", "resume=1,2", "--", *SHORT], "--grid resume: not a config key"),
    (["sweep", *ABL, "--grid", "seed=1,2", "--", *SHORT], "give the seeds with --seeds"),
    (["sweep", *ABL, "--grid", "alpha=10", "--grid", "alpha=20", "--", *SHORT], "the key alpha is given twice"),
    (["sweep", *ABL, "--grid", "alpha=10,20", "--", *SHORT, "--alpha", "5"], "--alpha in the training arguments"),
    (["sweep", *ABL, "--grid", "alpha=10,20", "--", *SHORT, "--gkl-wmse-weight", "5"],  # alpha's new name
     "--gkl-wmse-weight in the training arguments sets what --grid alpha sweeps"),
    (["sweep", *ABL, "--grid", "alpha=10,20", "--", *SHORT, "--out", "x"], "--out in the training arguments"),
    (["sweep", *ABL, "--grid", "alpha=10,20", "--eval-args", "--out x", "--", *SHORT], "--out in --eval-args"),
    (["sweep", *ABL, "--grid", "alpha=10,1o", "--", *SHORT], "alpha=1o/seed0: "),
    (["sweep", *ABL, "--grid", "alpha=10", "--eval-args", "--attacks nosuchattack", "--", *SHORT], "nosuchattack"),
])
def test_bad_input_is_one_line_and_submits_nothing(argv, says, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, [argv[0], "--executor", "local", *argv[1:]])
    assert says in line, line
    assert list(tmp_path.iterdir()) == []  # no run folder, no jobs folder, no manifest


def test_executor_slurm_without_slurm_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    line = one_line_error(capsys, ["train", "--executor", "slurm", "--", *SHORT, "--out", "run"])
    assert "sbatch is not on PATH" in line and "--executor local" in line
    assert list(tmp_path.iterdir()) == []


def test_grid_keys_are_the_config_parsers_and_values_name_folders():
    grid = parse_grid(["attack-alpha=0,1", "beta=3,4", "eps=8/255,16/255"])
    assert grid == {"attack_alpha": ["0", "1"], "beta": ["3", "4"], "eps": ["8/255", "16/255"]}
    assert run_dir_name({"attack_alpha": "0", "eps": "8/255"}, 2) == "attack_alpha=0,eps=8over255/seed2"
    with pytest.raises(UserError, match="a value is repeated"):
        parse_grid(["beta=3,3"])


def test_a_local_job_equals_a_direct_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in (["submit.py", "train", "--executor", "local", "--wait", "--", *SHORT, "--out", str(tmp_path / "job")],
                 ["train_at.py", *SHORT, "--out", str(tmp_path / "direct")]):
        out = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("job", "direct"))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])
    jobs = (tmp_path / "job" / "jobs.csv").read_text().splitlines()
    assert len(jobs) == 2 and ",train,.,COMPLETED,local," in jobs[1]
    (tmp_path / "job" / "jobs.csv").write_text("\n".join([jobs[0], jobs[1].replace("COMPLETED", "SUBMITTED")]) + "\n")
    assert [r["state"] for r in refresh_states(tmp_path / "job" / "jobs.csv")] == ["COMPLETED"]  # from its result
    assert (tmp_path / "job" / "allocations.csv").read_text().splitlines()[1].split(",")[8] == "finished"


@pytest.fixture
def half_done_sweep(tmp_path, monkeypatch):
    """A sweep of alpha=10,20 (2 epochs of 1 step): alpha=10 trained and evaluated, alpha=20 stopped after step 1."""
    import eval_autoattack
    import train_at
    import training.trainer as trainer_module

    folder = tmp_path / "abl"
    train = [*SHORT[:3], "2", *SHORT[4:]]  # --epochs 2
    sweep = merge(folder, Sweep(train, ["--attacks", "clean", "--n-ex", "8", "--quiet"], {"alpha": ["10", "20"]}, [0]))
    sweep.save(folder)
    first, second = sweep.runs
    assert train_at.main(sweep.run_argv(first, folder)) == 0
    assert eval_autoattack.main(sweep.eval_argv(first, folder)) == 0
    stop_after = trainer_module.Trainer._stop_requested
    monkeypatch.setattr(trainer_module.Trainer, "_stop_requested",
                        lambda self, *a: self.global_step >= 1 or stop_after(self, *a))
    assert train_at.main(sweep.run_argv(second, folder)) != 0  # stopped mid-way with a checkpoint of step 1
    monkeypatch.undo()
    return folder, sweep


def test_submitting_a_sweep_again_plans_only_what_is_left(half_done_sweep):
    from cluster.planning import plan_sweep

    folder, sweep = half_done_sweep
    grown = merge(folder, Sweep(sweep.train_args, sweep.eval_args, {"alpha": ["20", "30"]}, [0, 1]))
    assert grown.grid == {"alpha": ["10", "20", "30"]} and grown.seeds == [0, 1]
    assert [r["dir"] for r in grown.runs] == ["alpha=10/seed0", "alpha=20/seed0", "alpha=10/seed1", "alpha=20/seed1",
                                              "alpha=30/seed0", "alpha=30/seed1"]
    plans = {p.dir: p for p in plan_sweep(grown, folder, max_requeues=3)}
    done = plans["alpha=10/seed0"]
    assert done.train is None and done.eval is None and done.notes == ["finished and evaluated"]
    resumed = plans["alpha=20/seed0"]
    assert resumed.train.job.argv[:2] == ["--resume", str(folder / "alpha=20/seed0")]
    assert resumed.eval is not None and resumed.notes == ["resumed"]
    for new in ("alpha=10/seed1", "alpha=20/seed1", "alpha=30/seed0", "alpha=30/seed1"):
        assert plans[new].train.job.argv[-2:] == ["--out", str(folder / new)] and plans[new].eval is not None
        assert plans[new].train.job.max_requeues == 3 and plans[new].notes == ["new"]
    with pytest.raises(UserError, match="other arguments"):
        merge(folder, Sweep(sweep.train_args + ["--lr", "0.1"], sweep.eval_args, {"alpha": ["10"]}, [0]))
    with pytest.raises(UserError, match="sweeps alpha, not beta"):
        merge(folder, Sweep(sweep.train_args, sweep.eval_args, {"beta": ["3"]}, [0]))
