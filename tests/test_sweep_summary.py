"""python -m evaluation.compare SWEEP: per grid point mean/std over seeds, pooled Wilson intervals, paired
McNemar against a baseline, summary.{csv,md,json,png}; checked against values computed here from per_sample.csv."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from scipy.stats import binomtest

import eval_autoattack
from checkpoints.io import save_checkpoint
from evaluation.compare import main as compare_main
from training.config import TrainConfig, save_config

EVAL = ["--eps", "8/255", "16/255", "--attacks", "pgd5", "--n-ex", "48", "--batch-size", "48", "--quiet"]
GRID = {"alpha": ["10", "20"]}
SEEDS = (0, 1)
Z = 1.959963984540054


def _run_folder(folder: Path, model: torch.nn.Module, alpha: str, seed: int, **config) -> None:
    """A run folder as train_at.py leaves it (config.yaml, checkpoints/last.pt), with the model's weights
    moved by seeded noise so that every seed scores differently."""
    g = torch.Generator().manual_seed(1000 + seed)
    sd = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1
          else v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(dataset="digits", arch="small-cnn", alpha=float(alpha), seed=seed, **config)
    (folder / "checkpoints").mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    save_checkpoint({"format": "gkl-at/1", "model": sd, "avg_model": None, "arch": "small-cnn", "num_classes": 10,
                     "dataset": "digits", "config": cfg.to_dict(), "epoch": 3, "global_step": 30},
                    folder / "checkpoints" / "last.pt")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, digits_model, robust_digits_model) -> Path:
    """A 2-value x 2-seed sweep laid out as submit.py writes it, every run evaluated, plus two listed runs
    without an evaluation: one never started, one whose training job failed (SWEEP/jobs.csv)."""
    root = tmp_path_factory.mktemp("sweep")
    runs = []
    for alpha, model in zip(GRID["alpha"], (robust_digits_model, digits_model)):
        for seed in SEEDS:
            d = f"alpha={alpha}/seed{seed}"
            _run_folder(root / d, model, alpha, seed, device="cpu" if seed else "auto")  # device: not a grid key
            assert eval_autoattack.main([str(root / d), *EVAL, "--tracker", "none"]) == 0
            runs.append({"dir": d, "point": {"alpha": alpha}, "seed": seed})
    runs += [{"dir": "alpha=20/seed2", "point": {"alpha": "20"}, "seed": 2},
             {"dir": "alpha=30/seed0", "point": {"alpha": "30"}, "seed": 0}]
    manifest = {"format": "gkl-at-sweep/1", "train_args": ["--preset", "quickstart"], "eval_args": EVAL,
                "grid": {**GRID, "alpha": GRID["alpha"] + ["30"]}, "seeds": [0, 1, 2], "runs": runs}
    (root / "sweep.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    (root / "jobs.csv").write_text("job_id,kind,dir,state,stdout,stderr\n"
                                   "101,train,alpha=30/seed0,FAILED,a.out,a.err\n")
    return root


def _wilson(k: int, n: int) -> tuple[float, float]:
    p, z2 = k / n, Z * Z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), Z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _by_hand(root: Path, baseline: str) -> pd.DataFrame:
    """The summary computed here from each run's eval/per_sample.csv with pandas and scipy."""
    flags = {(a, s): pd.read_csv(root / f"alpha={a}/seed{s}/eval/per_sample.csv", index_col=0)
             for a in GRID["alpha"] for s in SEEDS}
    rows = []
    for alpha in GRID["alpha"]:
        for column in flags[(alpha, 0)].columns.drop("label"):
            per_seed = pd.Series([flags[(alpha, s)][column].mean() for s in SEEDS])
            k = sum(int(flags[(alpha, s)][column].sum()) for s in SEEDS)
            n = sum(len(flags[(alpha, s)]) for s in SEEDS)
            row = {"alpha": alpha, "metric": column if column == "clean" else f"Linf {column}",
                   "mean": per_seed.mean(), "std": per_seed.std(), "pooled_correct": k, "pooled_n": n}
            row["ci_low"], row["ci_high"] = _wilson(k, n)
            if alpha != baseline:
                base = pd.concat([flags[(baseline, s)][column] for s in SEEDS]).to_numpy()
                this = pd.concat([flags[(alpha, s)][column] for s in SEEDS]).to_numpy()
                only_base, only_this = int(((base == 1) & (this == 0)).sum()), int(((base == 0) & (this == 1)).sum())
                row.update(only_baseline=only_base, only_this=only_this, difference=(only_this - only_base) / n,
                           mcnemar_p=binomtest(only_base, only_base + only_this, 0.5).pvalue
                           if only_base + only_this else 1.0)
            rows.append(row)
    return pd.DataFrame(rows)


def _summary(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "summary.csv", dtype={"alpha": str, "point": str})


def test_summary_csv_equals_values_computed_from_per_sample_csv(sweep, capsys):
    assert compare_main([str(sweep), "--baseline", "alpha=10"]) == 0
    out = capsys.readouterr().out
    got = _summary(sweep).set_index(["alpha", "metric"])
    expected = _by_hand(sweep, baseline="10").set_index(["alpha", "metric"])
    assert sorted(got.index) == sorted(expected.index)
    assert set(got["attack"]) == {"clean", "pgd5", "worst"} and (got["seeds"] == 2).all()
    assert got["std"].gt(0).any(), "the seeds' noise must make some accuracies differ between seeds"
    for column in expected.columns:
        pd.testing.assert_series_equal(got.loc[expected.index, column], expected[column], check_dtype=False,
                                       check_names=False, rtol=1e-9, atol=1e-12)
    base = got.xs("10", level="alpha")
    assert base["mcnemar_p"].isna().all()  # the baseline is not paired with itself
    # One note names both runs without an evaluation and why.
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "2 of 6 runs" in notes[0]
    assert "alpha=20/seed2 (not started)" in notes[0] and "alpha=30/seed0 (failed: train job 101 FAILED)" in notes[0]


def test_the_summary_files_agree_and_show_each_point(sweep):
    assert compare_main([str(sweep), "--baseline", "alpha=10"]) == 0
    frame = _summary(sweep)
    data = json.loads((sweep / "summary.json").read_text())
    assert data["format"] == "gkl-at-sweep-summary/1" and data["baseline"] == {"alpha": "10"}
    assert len(data["rows"]) == len(frame) and data["points"]["n"] == 48
    assert [r["metric"] for r in data["rows"]] == list(frame["metric"])
    md = (sweep / "summary.md").read_text()
    clean = frame[frame["metric"] == "clean"].set_index("alpha")
    for alpha in GRID["alpha"]:  # the mean ± std table's row of each point
        mean, std = 100 * clean.loc[alpha, "mean"], 100 * clean.loc[alpha, "std"]
        assert f"| {alpha} | 0 1 | {mean:.2f} ± {std:.2f} |" in md
    worst = frame[(frame["alpha"] == "20") & (frame["metric"] == "Linf worst@16/255")].iloc[0]
    assert f"{worst['mcnemar_p']:.3g} |" in md
    png = (sweep / "summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_folder_without_manifest_is_grouped_by_its_differing_config_keys(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("sweep.yaml", "jobs.csv", "summary.*"))
    assert compare_main([str(copy)]) == 0
    assert "note:" not in capsys.readouterr().out  # every run found is evaluated
    got = _summary(copy).set_index(["alpha", "metric"])
    manifest = _summary(sweep).set_index(["alpha", "metric"])
    assert list(got.index) == list(manifest.index)  # alpha is the one key: seed and device are not grid keys
    pd.testing.assert_frame_equal(got[["mean", "std", "ci_low", "ci_high"]], manifest[["mean", "std", "ci_low",
                                                                                         "ci_high"]])
    assert "mcnemar_p" not in got  # no --baseline, no paired test


def test_runs_evaluated_on_other_points_are_refused(sweep, tmp_path, capsys):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy)
    report = copy / "alpha=20/seed1/eval/report.json"
    data = json.loads(report.read_text())
    data["data"]["points"]["images_sha256"] = "0" * 64
    report.write_text(json.dumps(data))
    assert compare_main([str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alpha=20/seed1" in err[0] and "different points" in err[0]


@pytest.mark.parametrize("args, message", [
    (["--baseline", "beta=3"], "'beta' is not a swept key"),
    (["--baseline", "alpha=15"], "matches no grid point"),
    (["--baseline", "alpha"], "write KEY=VALUE"),
    (["--baseline", "alpha=30"], "has no evaluated run yet"),
    (["--unpaired"], "--unpaired is for RUN_A RUN_B"),
])
def test_bad_baselines_are_one_line(sweep, args, message, capsys):
    before = (sweep / "summary.csv").stat().st_mtime_ns if (sweep / "summary.csv").exists() else None
    assert compare_main([str(sweep), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    after = (sweep / "summary.csv").stat().st_mtime_ns if (sweep / "summary.csv").exists() else None
    assert before == after  # nothing written


def test_bad_sweep_folders_are_one_line(sweep, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "sweep.yaml").write_text("format: gkl-at-sweep/9\nruns: []\n")
    nothing = tmp_path / "nothing"
    shutil.copytree(sweep, nothing, ignore=shutil.ignore_patterns("eval", "summary.*"))
    two_runs = [str(sweep / "alpha=10/seed0"), str(sweep / "alpha=20/seed0")]
    cases = [([str(bad)], "not a sweep manifest"), ([str(nothing)], "none of the 6 runs"),
             ([*two_runs, "--baseline", "alpha=10"], "--baseline chooses a grid point of a sweep")]
    for args, message in cases:
        assert compare_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (nothing / "summary.csv").exists()


def test_the_two_run_compare_is_unchanged(sweep, capsys):
    a, b = sweep / "alpha=10/seed0", sweep / "alpha=20/seed0"
    assert compare_main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| run | clean | PGD-5 8/255 |") and "McNemar p" in out and "Sweep" not in out
