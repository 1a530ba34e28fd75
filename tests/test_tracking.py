"""Live tracking: every log.csv column as a TensorBoard scalar (read back with TensorBoard's own reader),
one point per epoch across a resume, an evaluation's accuracies equal to its report.json, --tracker none,
and a missing optional tracker package as one line."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import eval_autoattack
import train_at
from core.tracking import TRACKERS, make_tracker
from training.logging import scalar_tag

# GKL with AWP from epoch 2 (the loss parts, eps_t and the AWP flag move between the two epochs), made cheap:
# 200 training images (the other 1237 held out), 2 steps of 100 per epoch, a 2-step attack.
TRAIN = ["--preset", "quickstart", "--epochs", "2", "--awp-warmup", "2", "--val-size", "1237", "--batch-size", "100",
         "--attack-budget", "fixed", "--attack-steps", "2", "--attack-step-size", "4/255", "--eval-subset", "50",
         "--eval-pgd-steps", "2", "--no-progress"]
TRAIN_IMAGES, STEPS = 1437 - 1237, 2
EVAL = ["--eps", "Linf:8/255", "Linf:16/255", "L2:0.5", "--attacks", "pgd3", "--n-ex", "32", "--quiet"]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tracked") / "run"
    assert train_at.main([*TRAIN, "--out", str(folder)]) == 0
    return folder


def _assert_equals_log(tb: dict, log: pd.DataFrame) -> None:
    columns = [c for c in log.columns if c != "epoch"]
    assert sorted(tb) == sorted(scalar_tag(c) for c in columns)
    for c in columns:  # one point per epoch, in order, equal to the CSV (float32 in the event file)
        points = tb[scalar_tag(c)]
        assert [s for s, _ in points] == list(log["epoch"]), c
        assert [v for _, v in points] == pytest.approx(list(log[c]), rel=1e-6, abs=1e-7), c


def test_every_log_column_is_a_scalar_equal_to_log_csv(run):
    log = pd.read_csv(run / "log.csv")
    for column in ("train_loss", "train_wmse", "train_soft_ce", "train_acc_adv", "val_clean", "val_pgd", "lr",
                   "eps_x255", "attack_steps", "awp", "train_images_per_s", "train_step_time_s"):
        assert column in log, column
    assert list(log["awp"]) == [0, 1] and log["eps_x255"].is_monotonic_increasing
    _assert_equals_log(_scalars(run / "tb"), log)
    # The speed columns describe the epoch: its images and steps over its time.
    for _, row in log.iterrows():
        assert row["train_images_per_s"] * row["train_time_s"] == pytest.approx(TRAIN_IMAGES, rel=1e-9)
        assert row["train_step_time_s"] * STEPS == pytest.approx(row["train_time_s"], rel=1e-9)


def test_a_resume_keeps_one_point_per_epoch(run, tmp_path):
    """Killed after logging epoch 2 but before its checkpoint: the resumed run logs epoch 2 again and
    TensorBoard's reader shows only the new points."""
    crashed = tmp_path / "run"
    shutil.copytree(run, crashed)
    shutil.copy(crashed / "checkpoints" / "epoch_0001.pt", crashed / "checkpoints" / "last.pt")
    (crashed / "checkpoints" / "epoch_0002.pt").unlink()
    old = pd.read_csv(run / "log.csv")
    assert train_at.main(["--resume", str(crashed), "--no-progress"]) == 0
    new = pd.read_csv(crashed / "log.csv")
    assert len(list((crashed / "tb").glob("events.out.tfevents.*"))) == 2  # the first process's file is still there
    assert new.loc[1, "train_time_s"] != old.loc[1, "train_time_s"]  # so the points below tell which one is shown
    _assert_equals_log(_scalars(crashed / "tb"), new)


def test_evaluation_scalars_equal_report_json(run, capsys):
    out = run / "eval"
    assert eval_autoattack.main([str(run), *EVAL, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    expected = {"eval/clean": report["clean_accuracy"]}
    for part in [report, report["sections"]["L2"]]:
        for row in part["results"]:
            expected[f"eval/{part['settings']['norm']}/{row['attack']} at {row['eps_str']}"] = row["robust_accuracy"]
    assert len(expected) == 1 + 2 * 2 + 1 * 2  # clean; pgd3 and worst at two L-inf radii and one L2 radius
    tb = _scalars(out / "tb")
    assert sorted(tb) == sorted(expected)
    for tag, value in expected.items():  # at the evaluated checkpoint's epoch
        assert tb[tag] == [(2, pytest.approx(value, rel=1e-6, abs=1e-7))], tag
    # Evaluating the same checkpoint again replaces its points rather than adding to them.
    assert eval_autoattack.main([str(run), *EVAL, "--out", str(out), "--resume"]) == 0
    assert all(len(points) == 1 for points in _scalars(out / "tb").values())


def test_tracker_none_writes_nothing(run, tmp_path):
    out = tmp_path / "eval"
    assert eval_autoattack.main([str(run), "--eps", "8/255", "--attacks", "clean", "--n-ex", "8", "--quiet", "--out",
                                 str(out), "--tracker", "none"]) == 0
    assert (out / "report.json").is_file() and not (out / "tb").exists()
    with make_tracker("none", tmp_path / "x") as tracker:
        tracker.start(first_step=1)
        tracker.log({"a": 1.0}, step=1)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("tracker, package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_a_missing_tracker_package_is_one_line(tracker, package, run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tracker, None)  # import fails as if not installed
    fresh = tmp_path / "fresh"
    assert train_at.main([*TRAIN, "--out", str(fresh), "--tracker", tracker]) == 2
    assert eval_autoattack.main([str(run), *EVAL, "--out", str(tmp_path / "eval"), "--tracker", tracker]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"error: --tracker {tracker} needs the optional package {package}: pip install {package} "
                      f"(or choose another --tracker: {', '.join(TRACKERS)})"] * 2
    assert not fresh.exists() and not (tmp_path / "eval").exists()  # refused before anything was written


def test_an_unknown_tracker_is_one_line(run, tmp_path, capsys):
    assert train_at.main([*TRAIN, "--out", str(tmp_path / "r"), "--tracker", "comet"]) == 2
    assert eval_autoattack.main([str(run), *EVAL, "--out", str(tmp_path / "e"), "--tracker", "comet"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("--tracker 'comet' is not one of: tensorboard, wandb, mlflow, none" in e
                                    for e in errors)


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_optional_trackers_log_offline(name, tmp_path, monkeypatch):
    """Where the optional package is installed: offline logging and a resumed run that continues the same run."""
    pytest.importorskip(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ids = []
    for first, steps in ((1, (1, 2)), (3, (3,))):  # a run, then its resume from epoch 3
        with make_tracker(name, tmp_path, config={"alpha": 20.0}) as tracker:
            tracker.start(first_step=first)
            for step in steps:
                tracker.log({"train/loss": 1.0 / step}, step=step)
        ids.append((tmp_path / f"{name}_run_id").read_text().strip())
    assert ids[0] == ids[1] and ids[0]
    if name == "mlflow":
        from mlflow.tracking import MlflowClient

        from core.tracking import mlflow_store

        client = MlflowClient(tracking_uri=mlflow_store(tmp_path))
        history = client.get_metric_history(ids[0], "train/loss")
        assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    else:
        assert any((tmp_path / "wandb").glob(f"offline-run-*-{ids[0]}"))
