"""eval_autoattack.py on 1, 2 and 3 gloo processes: byte-identical per_sample.csv, and resume after SIGKILL.

Every run evaluates the first 20 digits test points of a partly robust small CNN with clean,
PGD-10, CW-10 and a custom AutoAttack (APGD-CE, APGD-T) at 8/255 and 16/255, in chunks of 6 points
(6, 6, 6, 2) and batches of 4, so batches are split inside chunks and the 3-process run gives
rank 0 two chunks. AutoAttack's budgets are cut to 10 iterations and 3 target classes in every
process (the test's cost; the code path is the real one). Processes are started with
``torch.multiprocessing`` under the environment torchrun would set; the 1-process runs call
``main`` in the test process, which is the same code path with WORLD_SIZE unset.

The killed run: rank 1 of 2 SIGKILLs itself as it starts its 4th AutoAttack component, i.e. in the
middle of its second chunk's AutoAttack at 8/255 (APGD-CE of that chunk finished and saved in the
chunk's state file); torch.multiprocessing then terminates rank 0, as torchrun would.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import eval_autoattack
from checkpoints.io import save_checkpoint
from training.config import TrainConfig, save_config

AA_MODULE = importlib.import_module("attacks.autoattack")
RUN_ONE = AA_MODULE._run_one_attack
MAKE = AA_MODULE._make_adversary
ARGS = ["--eps", "8", "16", "--attacks", "pgd10", "cw10", "aa:apgd-ce,apgd-t", "--n-ex", "20", "--chunk-size", "6",
        "--batch-size", "4", "--device", "cpu", "--quiet"]
AA = "aa:apgd-ce,apgd-t"
CHUNKS = [range(0, 6), range(6, 12), range(12, 18), range(18, 20)]
KILL_AT = 4  # rank 1's 4th component: chunk 3's APGD-T at 8/255


def _cheap_autoattack(calls: list, kill_at: int | None = None) -> None:
    """Cut AutoAttack's budgets (every process must use the same) and count its components."""
    def make(*args, **kwargs):
        adversary = MAKE(*args, **kwargs)
        adversary.apgd.n_iter = adversary.apgd_targeted.n_iter = 10
        adversary.apgd_targeted.n_target_classes = 3
        return adversary

    def run_one(*args, **kwargs):
        calls.append(args[1])
        if kill_at is not None and len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return RUN_ONE(*args, **kwargs)

    AA_MODULE._make_adversary, AA_MODULE._run_one_attack = make, run_one


def _worker(rank: int, world: int, port: int, argv: list[str], record: str, kill_rank: int | None) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    calls: list = []
    _cheap_autoattack(calls, KILL_AT if rank == kill_rank else None)
    code = eval_autoattack.main(argv)
    Path(f"{record}-rank{rank}.json").write_text(json.dumps({"code": code, "calls": len(calls)}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(world: int, argv: list[str], record: Path, kill_rank: int | None = None):
    return mp.start_processes(_worker, args=(world, _free_port(), argv, str(record), kill_rank), nprocs=world,
                              join=False, start_method="spawn")


def _join(ctx) -> None:
    while not ctx.join():
        pass


def _records(record: Path, world: int) -> list[dict]:
    return [json.loads(Path(f"{record}-rank{r}.json").read_text()) for r in range(world)]


def _in_process(argv: list[str], monkeypatch) -> int:
    """One process, in this one; returns the number of AutoAttack components it ran."""
    calls: list = []
    with monkeypatch.context() as m:
        m.setattr(AA_MODULE, "_make_adversary", AA_MODULE._make_adversary)
        m.setattr(AA_MODULE, "_run_one_attack", AA_MODULE._run_one_attack)
        _cheap_autoattack(calls)
        assert eval_autoattack.main(argv) == 0
    return len(calls)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, robust_digits_model):
    root = tmp_path_factory.mktemp("sharded")
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = TrainConfig(dataset="digits", arch="small-cnn")
    save_config(cfg, run / "config.yaml")
    sd = {k: v.clone() for k, v in robust_digits_model.state_dict().items()}
    save_checkpoint({"format": "gkl-at/1", "model": sd, "avg_model": None, "arch": "small-cnn", "num_classes": 10,
                     "dataset": "digits", "config": cfg.to_dict(), "epoch": 1, "global_step": 1},
                    run / "checkpoints" / "last.pt")

    def argv(name: str, *extra: str) -> list[str]:
        return [str(run), *ARGS, "--out", str(root / name), *extra]

    two, three = _start(2, argv("w2"), root / "w2"), _start(3, argv("w3"), root / "w3")
    with pytest.MonkeyPatch.context() as mpatch:
        calls = {"w1": _in_process(argv("w1"), mpatch)}  # meanwhile, the single-process reference
    _join(two)
    _join(three)
    killed = _start(2, argv("killed"), root / "killed", kill_rank=1)
    with pytest.raises(mp.ProcessExitedException):
        _join(killed)
    assert list((root / "killed" / "cache").glob("*.aa_state.pt")), "no AutoAttack state left by the killed run"
    assert not (root / "killed" / "per_sample.csv").exists()
    shutil.copytree(root / "killed", root / "killed1")
    resumed = _start(2, argv("killed", "--resume"), root / "resume2")
    with pytest.MonkeyPatch.context() as mpatch:
        calls["resume1"] = _in_process(argv("killed1", "--resume"), mpatch)  # 2-process state, 1 process
    _join(resumed)
    for name, world in (("w2", 2), ("w3", 3), ("resume2", 2)):
        records = _records(root / name, world)
        assert [r["code"] for r in records] == [0] * world, name
        calls[name] = sum(r["calls"] for r in records)
    return root, calls


def _report(folder: Path) -> dict:
    """report.json without what may differ between runs: times, dates, paths, process count."""
    report = json.loads((folder / "report.json").read_text())
    for row in report["results"]:
        row.pop("seconds", None)
        row.pop("resumed", None)
    for key in ("created", "wall_seconds", "environment", "command", "out"):
        report.pop(key, None)
    return report


@pytest.mark.parametrize("other", ["w2", "w3", "killed", "killed1"])
def test_per_sample_flags_are_byte_identical_for_any_world_size_and_after_resume(runs, other):
    root, _ = runs
    reference = (root / "w1" / "per_sample.csv").read_bytes()
    assert (root / other / "per_sample.csv").read_bytes() == reference
    for table in ("table_eps.csv", "table_attacks.csv"):
        assert (root / other / table).read_bytes() == (root / "w1" / table).read_bytes(), table
    assert _report(root / other) == _report(root / "w1")


def test_the_flags_are_not_trivial(runs):
    import pandas as pd

    root, _ = runs
    flags = pd.read_csv(root / "w1" / "per_sample.csv", index_col=0)
    aa = flags[f"{AA}@16/255"]
    assert 0 < aa.sum() < flags["clean"].sum()  # AutoAttack broke some points and not all
    assert (flags[f"{AA}@16/255"] <= flags[f"{AA}@8/255"]).all()
    report = json.loads((root / "w3" / "report.json").read_text())
    assert report["environment"]["processes"] == 3 and report["settings"]["chunk_size"] == 6


def _components(root: Path) -> int:
    """AutoAttack components an uninterrupted run calls: 2 per (eps, chunk) with points left to attack."""
    import pandas as pd

    flags = pd.read_csv(root / "w1" / "per_sample.csv", index_col=0)
    before = [flags["clean"], flags[f"{AA}@8/255"]]  # AutoAttack's candidates at 8/255, then at 16/255
    return sum(2 for candidates in before for chunk in CHUNKS if candidates.iloc[list(chunk)].any())


def test_every_component_runs_once_and_a_resume_continues_inside_the_killed_chunk(runs):
    root, calls = runs
    total = _components(root)
    assert total > 8 and calls["w1"] == calls["w2"] == calls["w3"] == total
    # Rank 1 (chunks 1 and 3) finished 3 components before it died: chunk 1's two at 8/255 and chunk
    # 3's APGD-CE; rank 0 some more. A resume redoes none of them, so at most total - 3 run again.
    import pandas as pd

    flags = pd.read_csv(root / "w1" / "per_sample.csv", index_col=0)["clean"]
    assert flags.iloc[list(CHUNKS[1])].any() and flags.iloc[list(CHUNKS[3])].any()  # the premise of KILL_AT
    assert calls["resume2"] <= total - (KILL_AT - 1)
    assert calls["resume1"] <= total - (KILL_AT - 1)
