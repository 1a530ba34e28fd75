"""Ranks from Slurm's environment, and an evaluation with more processes than chunks.

- ``srun`` with N > 1 tasks gives torchrun's variables (rank, world size, local rank, the first node
  and a port from the job id); torchrun's own, a batch script's single python and a 1-task step are
  left alone (the 2-task job on a real Slurm is in test_submit_slurm.py);
- three processes evaluate 8 points in 2 chunks: rank 2 idles, one note names it, and
  ``per_sample.csv`` equals a single process's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.distributed import SLURM_PORT_BASE, first_host, slurm_launch_env
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent
STEP = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_NTASKS": "8"}


def test_srun_tasks_get_torchruns_variables():
    assert slurm_launch_env(STEP) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                      "MASTER_PORT": str(SLURM_PORT_BASE + 123456 % 40000)}
    mine = slurm_launch_env({**STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (mine["MASTER_ADDR"], mine["MASTER_PORT"]) == ("10.0.0.1", "29500")


@pytest.mark.parametrize("env", [
    {k: v for k, v in STEP.items() if k != "SLURM_STEP_NUM_TASKS"},  # the batch script itself: one python
    {**STEP, "SLURM_STEP_NUM_TASKS": "1"},  # a 1-task step
    {**STEP, "WORLD_SIZE": "2"},  # torchrun inside a Slurm job: torchrun's variables win
    {},
])
def test_no_slurm_step_of_several_tasks_leaves_the_environment_alone(env):
    assert slurm_launch_env(env) is None


def test_node_lists_and_broken_steps():
    assert [first_host(t) for t in ("vm", "a,b", "gpu[07-09,12],cpu1", "r[1-2]-n[3,4]", "x[5]")] == \
        ["vm", "a", "gpu07", "r1-n3", "x5"]
    with pytest.raises(UserError, match="SLURM_PROCID"):
        slurm_launch_env({"SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "1"})


def test_more_processes_than_chunks_idle_and_change_nothing(tmp_path, robust_digits_model):
    import pandas as pd
    import torch

    weights = tmp_path / "model.pt"
    torch.save(robust_digits_model.state_dict(), weights)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(weights), "--arch", "small-cnn", "--dataset", "digits", "--attacks", "clean", "pgd10", "--eps", "8/255",
            "16/255", "--n-ex", "12", "--chunk-size", "6", "--quiet"]
    one = subprocess.run([sys.executable, "eval_autoattack.py", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    three = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3",
                            "eval_autoattack.py", *args, "--out", str(tmp_path / "three")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert one.returncode == 0 and three.returncode == 0, three.stderr[-2000:]
    notes = [line for line in three.stderr.splitlines() if "no chunk" in line]
    assert notes == ["note: 3 processes but --chunk-size 6 splits the 12 points into 2 chunk(s): rank 2 gets no "
                     "chunk and waits idle (results unchanged; --chunk-size 4 or less gives every process a chunk)"]
    assert (tmp_path / "three" / "per_sample.csv").read_bytes() == (tmp_path / "one" / "per_sample.csv").read_bytes()
    flags = pd.read_csv(tmp_path / "one" / "per_sample.csv").select_dtypes("number").drop(columns="index",
                                                                                            errors="ignore")
    assert flags.nunique().max() > 1, flags  # not the same flag for every point: the comparison can fail
    assert '"processes": 3' in (tmp_path / "three" / "report.json").read_text()
