"""Every board from one tool: several norms and the corruptions in one report, compare, export, claim."""
from __future__ import annotations

import json
import os
import runpy
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cifar_fixture import fake_cifar_root  # noqa: F401  (fixture)
from corruptions_fixture import write_fake_cifar_c
from test_eval_cli import run_dir  # noqa: F401  (fixture)
from test_robustbench_export import _make_run

import eval_autoattack
import export as rbx
import export_robustbench
from data.corruptions import CORRUPTIONS, SEVERITIES
from evaluation.compare import comparison_table
from evaluation.report import read_report

CARD = ["--name", "GKL", "--authors", "A, B", "--venue", "TPAMI", "--link", "https://example.org/paper"]


def _constant_small_cnn(path: Path, label: int) -> Path:
    """A small-cnn state dict that answers ``label`` for every image (zero last layer, one bias)."""
    from models import build_model

    model = build_model("small-cnn", num_classes=10)
    sd = model.state_dict()
    sd["fc.weight"].zero_()
    sd["fc.bias"].copy_(torch.nn.functional.one_hot(torch.tensor(label), 10).float() * 5)
    torch.save(sd, path)
    return path


def test_several_norms_in_one_report_and_compare(run_dir, capsys) -> None:  # noqa: F811
    args = [str(run_dir), "--norm", "Linf", "L2", "L1", "--eps", "Linf:8/255", "L2:0.5", "L2:1", "L1:6",
            "--attacks", "pgd5", "--n-ex", "24", "--batch-size", "24", "--quiet"]
    assert eval_autoattack.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("Linf:") == printed.count("L2:") == printed.count("L1:") == 1
    out = run_dir / "eval"
    report = read_report(out / "report.json")
    assert report.norms == ["Linf", "L2", "L1"] and report.norm == "Linf"
    l2, l1 = report.threat("L2"), report.threat("L1")
    assert [r.eps_str for r in l2.rows if r.attack == "pgd5"] == ["0.5", "1"]
    assert [r.eps_str for r in l1.rows if r.attack == "pgd5"] == ["6"]
    assert l2.find("pgd5", 1.0).robust_accuracy <= l2.find("pgd5", 0.5).robust_accuracy <= l2.clean_accuracy
    assert l1.clean_accuracy == report.clean_accuracy
    text = (out / "report.md").read_text()
    assert "## L2 threat model" in text and "## L1 threat model" in text and "| 0.5 |" in text
    assert "### L1: sanity checks" in text  # each norm's own checks
    # each norm's per-class table inside its own section (one top-level per-class heading: the main norm's)
    assert text.count("## Per class") == 1 and "### L2: per class" in text and "### L1: per class" in text
    assert text.index("## L2 threat model") < text.index("### L2: per class") < text.index("## L1 threat model")
    assert pd.read_csv(out / "table_attacks_L1.csv", index_col=0, dtype={"eps": str}).index.tolist() == ["6"]
    assert pd.read_csv(out / "per_class_L2.csv", index_col=0).columns[:2].tolist() == ["n", "clean"]
    for name in ("table_eps_L2.csv", "per_sample_L2.csv", "robust_vs_eps_L2.png", "robust_vs_eps_L1.png"):
        assert (out / name).is_file(), name
    header = comparison_table([str(run_dir)]).splitlines()[0]
    assert "PGD-5 8/255" in header and "PGD-5 L2 0.5" in header and "PGD-5 L1 6" in header


def test_resume_adds_a_norm_and_reuses_the_finished_one(run_dir, capsys) -> None:  # noqa: F811
    # docs/EVALUATION.md: "to add a norm to a finished evaluation, rerun with the longer --norm list and --resume".
    common = [str(run_dir), "--attacks", "pgd5", "--n-ex", "24", "--batch-size", "24", "--chunk-size", "12", "--quiet"]
    assert eval_autoattack.main([*common, "--norm", "Linf", "--eps", "8/255"]) == 0
    first = read_report(run_dir / "eval" / "report.json")
    assert eval_autoattack.main([*common, "--resume", "--norm", "Linf", "L2", "--eps", "Linf:8/255", "L2:0.5"]) == 0
    report = read_report(run_dir / "eval" / "report.json")
    assert report.norms == ["Linf", "L2"]
    assert [r["resumed"] for r in report.raw["results"] if r["attack"] == "pgd5"] == [True]
    assert [r["resumed"] for r in report.threat("L2").raw["results"] if r["attack"] == "pgd5"] == [False]
    assert report.raw["per_sample"] == first.raw["per_sample"]
    capsys.readouterr()
    # Other radii for a norm the saved run evaluated are still refused, nothing written.
    before = (run_dir / "eval" / "report.json").read_bytes()
    assert eval_autoattack.main([*common, "--resume", "--norm", "Linf", "L2", "--eps", "Linf:8/255", "L2:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made for --eps Linf:8/255 L2:0.5" in err[0]
    assert (run_dir / "eval" / "report.json").read_bytes() == before


def test_constant_model_corruptions_through_the_cli(fake_cifar_root, tmp_path, capsys) -> None:  # noqa: F811
    # Severity s of each corruption has label 7 on the first s of its 5 images: a model that always
    # answers 7 scores s/5 at severity s, (1+2+3+4+5)/25 = 60% on average.
    labels = np.concatenate([[7] * s + [0] * (5 - s) for s in SEVERITIES])
    write_fake_cifar_c(fake_cifar_root, ("fog", "contrast"), 5, labels=labels)
    weights = _constant_small_cnn(tmp_path / "constant.pt", 7)
    out = tmp_path / "eval"
    args = [str(weights), "--arch", "small-cnn", "--dataset", "cifar10", "--data-dir", str(fake_cifar_root),
            "--attacks", "clean", "corruptions", "--corruptions", "fog", "contrast", "--out", str(out), "--quiet"]
    assert eval_autoattack.main(args) == 0
    assert "CIFAR-10-C mean 60.00% over 10 pairs" in capsys.readouterr().out
    report = read_report(out / "report.json")
    test_labels = np.array(pd.read_pickle(fake_cifar_root / "cifar-10-batches-py" / "test_batch")["labels"])
    assert report.clean_accuracy == pytest.approx((test_labels == 7).mean())
    corr = report.corruptions
    assert corr.mean_accuracy == pytest.approx(0.6) and corr.n_per_severity == 5 and not corr.robustbench_figure
    assert corr.accuracies == {(c, s): pytest.approx(s / 5) for c in ("fog", "contrast") for s in SEVERITIES}
    table = pd.read_csv(out / "table_corruptions.csv", index_col=0)
    assert table.loc["Mean"].tolist() == [20.0, 40.0, 60.0, 80.0, 100.0, 60.0]  # the per-severity row
    markdown = (out / "report.md").read_text()
    assert "## Common corruptions: CIFAR-10-C" in markdown
    # no eps attack ran: no "Worst" figure (it would only repeat the clean accuracy as if it were robust)
    assert "Worst" not in markdown and "No eps attack ran" in markdown and report.rows == []
    assert (out / "corruptions_heatmap.png").is_file()
    table = comparison_table([str(out / "report.json")]).splitlines()
    assert table[0] == "| run | clean | corruptions mean |" and table[2].endswith("| 60.00 |")


def _report_with_corruptions(run: Path, clean: list[bool], aa: list[bool], flags: dict, names=None) -> None:
    """RUN/eval/report.json with a Linf AutoAttack result and a corruptions section (all 15 by default)."""
    from checkpoints.run import load_model
    from evaluation.corruptions import CorruptionResult, CorruptionSection, CorruptionSettings
    from evaluation.report import write_reports
    from evaluation.suite import AttackResult, SuiteResult, SuiteSettings

    _, info = load_model(run)
    settings = SuiteSettings.build([8 / 255], ["aa"])
    result = SuiteResult(settings, torch.zeros(len(clean), dtype=torch.long), torch.tensor(clean))
    result.results[(settings.eps[0], "aa")] = AttackResult("aa", settings.eps[0], torch.tensor(aa), sum(clean), 1.0, 0)
    corr = CorruptionResult(CorruptionSettings.build(names), "cifar10", "/data/CIFAR-10-C", 10_000)
    corr.correct = {k: torch.tensor(v) for k, v in flags.items()}
    meta = {"model": info, "data": {"dataset": "cifar10", "split": "test", "n": len(clean)}}
    write_reports(result, run / "eval", meta, [CorruptionSection(corr)])


def test_export_writes_linf_and_corruptions_model_info(tmp_path, capsys) -> None:
    run, _, avg = _make_run(tmp_path, "wrn-10-1", "cifar10", 10, seed=4)
    rng = np.random.default_rng(0)
    flags = {(c, s): (rng.random(8) < 0.1 * s).tolist() for c in CORRUPTIONS for s in SEVERITIES}
    mean = np.mean([np.mean(f) for f in flags.values()])
    _report_with_corruptions(run, [True] * 7 + [False] * 3, [True] * 4 + [False] * 6, flags)
    out = tmp_path / "export"
    assert export_robustbench.main([str(run), "--out", str(out), "--model-name", "Me2026", *CARD,
                                    "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "model_info Linf:" in printed and "model_info corruptions:" in printed
    linf = json.loads((out / "model_info" / "cifar10" / "Linf" / "Me2026.json").read_text())
    corr = json.loads((out / "model_info" / "cifar10" / "corruptions" / "Me2026.json").read_text())
    assert (linf["clean_acc"], linf["autoattack_acc"], linf["eps"]) == ("70.00", "40.00", "8/255")
    assert list(corr) == [k for k in rbx.CORRUPTIONS_INFO_FIELDS if k != "footnote"]
    assert (corr["clean_acc"], corr["corruptions_acc"], corr["reported"], corr["eps"]) == \
        ("70.00", f"{100 * mean:.2f}", f"{100 * mean:.2f}", None)
    assert rbx.validate_model_info(corr, board="corruptions") == [] and rbx.validate_model_info(linf) == []
    assert rbx.validate_model_info(linf, board="corruptions") != []  # the boards' fields differ
    pt = {b: out / "models" / "cifar10" / b / "Me2026.pt" for b in ("Linf", "corruptions")}
    assert os.path.samefile(pt["Linf"], pt["corruptions"])
    zoo = (out / "zoo_entry.py").read_text()
    assert "`linf` and `common_corruptions` lists" in zoo
    model = runpy.run_path(str(out / "zoo_entry.py"))["ENTRY"][1]["model"]()
    model.load_state_dict(torch.load(pt["corruptions"], weights_only=True), strict=True)
    record = json.loads((out / "export.json").read_text())
    assert list(record["boards"]) == ["Linf", "corruptions"]
    assert record["boards"]["corruptions"]["evaluation"]["corruptions_accuracy"] == pytest.approx(mean)

    only = tmp_path / "only"
    assert export_robustbench.main([str(run), "--out", str(only), "--norm", "corruptions", "--device", "cpu"]) == 0
    assert [p.name for p in (only / "model_info" / "cifar10").iterdir()] == ["corruptions"]


def test_export_names_a_board_left_out_for_its_radius(tmp_path, capsys) -> None:
    # Linf AutoAttack at 4/255 (the run trained at 8/255, the radius the export looks for) and L2 at 0.5:
    # L2 is exported, and Linf is not left out in silence.
    from checkpoints.run import load_model
    from evaluation.report import write_reports
    from evaluation.sections import NormSection
    from evaluation.suite import AttackResult, SuiteResult, SuiteSettings

    run, _, _ = _make_run(tmp_path, "wrn-10-1", "cifar10", 10, seed=7)
    parts = []
    for norm, eps in (("Linf", 4 / 255), ("L2", 0.5)):
        result = SuiteResult(SuiteSettings.build([eps], ["aa"], norm=norm), torch.zeros(4, dtype=torch.long),
                             torch.tensor([True, True, True, False]))
        result.results[(eps, "aa")] = AttackResult("aa", eps, torch.tensor([True, False, False, False]), 3, 1.0, 0)
        parts.append(result)
    _, info = load_model(run)
    write_reports(parts[0], run / "eval", {"model": info, "data": {"dataset": "cifar10", "split": "test", "n": 4}},
                  [NormSection(parts[1])])
    out = tmp_path / "export"
    assert export_robustbench.main([str(run), "--out", str(out), *CARD, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "model_info L2:" in captured.out and "model_info Linf:" not in captured.out
    assert "note: Linf not exported: the evaluation's AutoAttack ran at 4/255, the export looks for 8/255; " \
           "pass --eps 4/255" in captured.err


def test_export_refuses_a_subset_of_the_corruptions_and_exports_the_other_boards(tmp_path, capsys) -> None:
    run, _, _ = _make_run(tmp_path, "wrn-10-1", "cifar10", 10, seed=5)
    partial = {(c, s): [True, False] for c in CORRUPTIONS[:3] for s in SEVERITIES}
    _report_with_corruptions(run, [True, False], [False, False], partial, names=CORRUPTIONS[:3])
    out = tmp_path / "out"
    assert export_robustbench.main([str(run), "--out", str(out), "--norm", "corruptions"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 of 15 corruptions" in err[0] and not out.exists()
    # without --norm the other boards still export, and the left-out one is named
    assert export_robustbench.main([str(run), "--out", str(out), *CARD, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "model_info Linf:" in captured.out and "model_info corruptions" not in captured.out
    assert "note: corruptions not exported:" in captured.err
    assert [p.name for p in (out / "model_info" / "cifar10").iterdir()] == ["Linf"]


def test_boards_match_robustbench() -> None:
    rbx.install_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset

    for dataset, boards in rbx.BOARDS.items():
        assert tuple(t.value for t in model_dicts[BenchmarkDataset(dataset)]) == boards
    import robustbench.model_zoo.cifar10 as zoo10

    for board, name in rbx.ZOO_LISTS.items():
        assert getattr(zoo10, name) is zoo10.cifar_10_models[next(t for t in zoo10.cifar_10_models if t.value == board)]


def test_claim_runs_robustbench_for_linf_and_corruptions_offline(fake_cifar_root, tmp_path, monkeypatch,  # noqa: F811
                                                                 capsys) -> None:
    """RobustBench's benchmark on both boards with its own CIFAR-10-C loader (files of the published size,
    sparse on disk; its list of corruptions cut to the one written, to keep the test short)."""
    rbx.install_robustbench()
    import robustbench.data as rb_data
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    monkeypatch.setitem(rb_data.CORRUPTIONS_DICT[BenchmarkDataset.cifar_10], ThreatModel.corruptions, ("fog",))
    folder = fake_cifar_root / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = np.lib.format.open_memmap(folder / "fog.npy", mode="w+", dtype=np.uint8, shape=(50_000, 32, 32, 3))
    for s in SEVERITIES:
        images[(s - 1) * 10_000:(s - 1) * 10_000 + 20] = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    images.flush()
    del images
    np.save(folder / "labels.npy", np.tile(rng.integers(0, 10, 10_000).astype(np.uint8), 5))

    run, _, _ = _make_run(tmp_path, "wrn-10-1", "cifar10", 10, seed=6)
    data = ["--data-dir", str(fake_cifar_root), "--device", "cpu"]
    data += ["--eps", "64/255"]  # AutoAttack is quick where nothing is robust
    assert eval_autoattack.main([str(run), *data, "--attacks", "aa", "corruptions", "--corruptions", "fog",
                                 "--n-ex", "20", "--quiet"]) == 0
    ours = read_report(run / "eval" / "report.json")
    out = tmp_path / "export"
    cwd = Path.cwd()
    assert export_robustbench.main([str(run), *data, "--claim", "--out", str(out), "--batch-size", "20"]) == 0
    assert Path.cwd() == cwd and not (cwd / "model_info").exists()  # robustbench's scratch files stayed out
    capsys.readouterr()
    claims = json.loads((out / "claim.json").read_text())["boards"]
    assert set(claims) == {"Linf", "corruptions"}
    assert claims["corruptions"]["n_examples"] == 20
    assert claims["corruptions"]["corruptions_accuracy"] == pytest.approx(ours.corruptions.mean_accuracy)
    assert claims["corruptions"]["clean_accuracy"] == pytest.approx(ours.clean_accuracy)
    info = json.loads((out / "model_info" / "cifar10" / "corruptions" / f"{run.name}.json").read_text())
    assert info["corruptions_acc"] == claims["corruptions"]["corruptions_acc"]
