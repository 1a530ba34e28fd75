"""RobustBench export: strict loading into RobustBench's classes, equal logits, model_info, claim."""
from __future__ import annotations

import copy
import json
import runpy
import socket
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import export_robustbench
import export as rbx
from cifar_fixture import fake_cifar_root  # noqa: F401  (fixture)
from checkpoints.io import save_checkpoint
from errors import UserError
from models import build_model
from training.config import TrainConfig, save_config

EPOCH, STEP = 3, 30


def _train_briefly(model: nn.Module, num_classes: int, steps: int, seed: int) -> None:
    """A few SGD steps on random images, so weights and BatchNorm statistics are not the initial ones."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.rand(8, 3, 32, 32, generator=g)
        y = torch.randint(0, num_classes, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _make_run(root: Path, arch: str, dataset: str, num_classes: int,
              seed: int = 0) -> tuple[Path, nn.Module, nn.Module]:
    """A run folder in the trainer's format; the averaged weights differ from the raw ones."""
    torch.manual_seed(seed)
    raw = build_model(arch, num_classes=num_classes)
    _train_briefly(raw, num_classes, steps=2, seed=seed)
    avg = copy.deepcopy(raw)
    _train_briefly(avg, num_classes, steps=1, seed=seed + 1)
    run = root / f"run-{arch}"
    cfg = TrainConfig(dataset=dataset, arch=arch, data_dir=str(root / "no-data"))
    (run / "checkpoints").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    state = {"format": "gkl-at/1", "model": raw.state_dict(), "avg_model": avg.state_dict(), "arch": arch,
             "num_classes": num_classes, "dataset": dataset, "config": cfg.to_dict(), "epoch": EPOCH,
             "global_step": STEP}
    save_checkpoint(state, run / "checkpoints" / "last.pt")
    return run, raw, avg


def _write_eval_report(run: Path, clean: list[bool], aa: list[bool], eps: float = 8 / 255) -> dict:
    """RUN/eval/report.json as eval_autoattack.py writes it (same report_dict and model info)."""
    from checkpoints.run import load_model
    from evaluation.report import environment_info, report_dict
    from evaluation.suite import AttackResult, SuiteResult, SuiteSettings

    _, info = load_model(run)
    settings = SuiteSettings.build([eps], ["aa"])
    result = SuiteResult(settings, torch.zeros(len(clean), dtype=torch.long), torch.tensor(clean))
    result.results[(settings.eps[0], "aa")] = AttackResult("aa", settings.eps[0], torch.tensor(aa), sum(clean), 1.0, 0)
    meta = {"model": info, "data": {"dataset": info["dataset"], "split": "test", "n": len(clean)},
            "environment": environment_info()}
    report = json.loads(json.dumps(report_dict(result, meta), default=str))
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "report.json").write_text(json.dumps(report))
    return report


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, nn.Module, nn.Module]]:
    root = tmp_path_factory.mktemp("rb_runs")
    return {"wrn": _make_run(root, "wrn-10-1", "cifar10", 10),
            "dm": _make_run(root, "wrn-16-4-silu", "cifar100", 100)}


def _rb_reference(family: str) -> nn.Module:
    """RobustBench's class built by hand, independently of the export's constructor call."""
    rbx.install_robustbench()
    if family == "wrn":
        from robustbench.model_zoo.architectures.wide_resnet import WideResNet

        return WideResNet(depth=10, widen_factor=1, num_classes=10, sub_block1=False)
    from robustbench.model_zoo.architectures.dm_wide_resnet import CIFAR100_MEAN, CIFAR100_STD, DMWideResNet

    return DMWideResNet(num_classes=100, depth=16, width=4, activation_fn=nn.SiLU, mean=CIFAR100_MEAN,
                        std=CIFAR100_STD)


def _logit_diff(a: nn.Module, b: nn.Module, seed: int = 1) -> float:
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return (a.eval()(x) - b.eval()(x)).abs().max().item()


@pytest.mark.parametrize("family", ["wrn", "dm"])
def test_export_from_run_loads_strictly_with_equal_logits(runs, family, tmp_path, capsys) -> None:
    run, raw, avg = runs[family]
    clean, aa = [True] * 7 + [False] * 3, [True] * 4 + [False] * 6
    _write_eval_report(run, clean, aa)
    out = tmp_path / "export"
    args = [str(run), "--out", str(out), "--model-name", "Test2024GKL_small", "--name", "GKL", "--authors", "A, B",
            "--venue", "TPAMI", "--link", "https://example.org/paper", "--device", "cpu"]
    assert export_robustbench.main(args) == 0
    printed = capsys.readouterr().out
    assert "max |logit diff| = 0.000e+00" in printed

    dataset = "cifar10" if family == "wrn" else "cifar100"
    sd = torch.load(out / "models" / dataset / "Linf" / "Test2024GKL_small.pt", weights_only=True)
    reference = _rb_reference(family)
    reference.load_state_dict(sd, strict=True)
    assert _logit_diff(reference, avg) < 1e-5  # the averaged weights were exported ...
    assert _logit_diff(reference, raw) > 1e-3  # ... not the raw ones

    entry = runpy.run_path(str(out / "zoo_entry.py"))["ENTRY"]
    assert entry[0] == "Test2024GKL_small"
    pasted = entry[1]["model"]()
    pasted.load_state_dict(sd, strict=True)
    assert type(pasted) is type(reference) and _logit_diff(pasted, avg) < 1e-5
    if family == "dm":
        assert "activation_fn=nn.SiLU" in (out / "zoo_entry.py").read_text()
        assert torch.equal(pasted.mean, reference.mean) and torch.equal(pasted.std, reference.std)

    info = json.loads((out / "model_info" / dataset / "Linf" / "Test2024GKL_small.json").read_text())
    assert rbx.validate_model_info(info) == []
    assert list(info) == [k for k in rbx.MODEL_INFO_FIELDS if k not in ("footnote", "external")]
    assert info["autoattack_implementation"] == json.loads((run / "eval" / "report.json").read_text())[
        "environment"]["autoattack"]["summary"]
    expected_arch = "WideResNet-10-1" if family == "wrn" else "WideResNet-16-4"
    assert (info["clean_acc"], info["autoattack_acc"], info["reported"]) == ("70.00", "40.00", "40.00")
    assert (info["eps"], info["dataset"], info["architecture"]) == ("8/255", dataset, expected_arch)
    assert (info["name"], info["authors"], info["additional_data"], info["number_forward_passes"]) == \
        ("GKL", "A, B", False, 1)
    record = json.loads((out / "export.json").read_text())
    assert record["weights_kind"] == "avg" and record["epoch"] == EPOCH
    assert record["verification"]["max_abs_logit_diff"] == 0.0


def _no_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_robustbench_load_model_loads_the_export_from_its_model_dir(runs, fmt, tmp_path, monkeypatch, capsys) -> None:
    """The round trip a maintainer makes: ENTRY pasted into RobustBench's zoo, then robustbench.utils.load_model
    from the export's models/ folder (real robustbench; offline: the file must be found, not downloaded)."""
    _no_network(monkeypatch)
    run, _, avg = runs["wrn"]
    out, name = tmp_path / "export", "Test2026RoundTrip_WRN-10-1"
    args = [str(run), "--out", str(out), "--model-name", name, "--allow-unevaluated", "--format", fmt, "--device", "cpu"]
    assert export_robustbench.main(args) == 0
    assert f"robustbench.utils.load_model(model_dir={out / 'models'}) loads" in capsys.readouterr().out
    rbx.install_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    entry_name, entry = runpy.run_path(str(out / "zoo_entry.py"))["ENTRY"]
    assert entry_name == name and isinstance(entry["gdrive_id"], str) and entry["gdrive_id"]
    linf = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    assert name not in linf  # the export's own check left RobustBench's zoo as it was
    monkeypatch.setitem(linf, name, entry)  # pasted into robustbench/model_zoo/cifar10.py
    model = load_model(model_name=name, model_dir=out / "models", dataset="cifar10", threat_model="Linf")
    assert _logit_diff(model, avg) < 1e-5
    folder = out / "models" / "cifar10" / "Linf"
    assert sorted(p.name for p in folder.iterdir()) == sorted({f"{name}.pt", f"{name}.{fmt}"})
    if fmt == "safetensors":
        from safetensors.torch import load_file

        pt, st = torch.load(folder / f"{name}.pt", weights_only=True), load_file(str(folder / f"{name}.safetensors"))
        assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    record = json.loads((out / "export.json").read_text())["verification"]["robustbench_load_model"]
    assert record["loader"] == "robustbench.utils.load_model" and record["max_abs_logit_diff"]["Linf"] < 1e-5


def test_the_maintainer_check_fails_where_robustbench_s_loader_would(runs, tmp_path, monkeypatch) -> None:
    from export import roundtrip

    _no_network(monkeypatch)
    run, _, avg = runs["wrn"]
    out = tmp_path / "export"
    assert export_robustbench.main([str(run), "--out", str(out), "--allow-unevaluated", "--device", "cpu"]) == 0
    entry, models = out / "zoo_entry.py", out / "models"
    assert roundtrip.verify_as_maintainer(avg, entry, models, "cifar10", "Linf", n=4) < 1e-5
    with pytest.raises(UserError, match="would download it"):  # weights not in place: no download attempt
        roundtrip.load_as_maintainer(entry, models, "cifar10", "L2")
    with pytest.raises(UserError, match="already has a model named 'Standard'"):
        with roundtrip.zoo_with_entry("Standard", {}, "cifar10", "Linf"):
            pass
    text = entry.read_text()
    entry.write_text(text.replace(repr(rbx.arch.GDRIVE_PLACEHOLDER), "None"))  # what the export wrote before
    with pytest.raises(rbx.ExportMismatch, match="gdrive_id"):
        roundtrip.load_as_maintainer(entry, models, "cifar10", "Linf")
    entry.write_text(text.replace("num_classes=10", "num_classes=100"))  # an entry that does not fit the file
    with pytest.raises(rbx.ExportMismatch, match="size mismatch"):
        roundtrip.load_as_maintainer(entry, models, "cifar10", "Linf")


@pytest.mark.parametrize("family", ["wrn", "dm", "preact"])
def test_robustbench_random_init_and_project_model_interchange(family) -> None:
    rbx.install_robustbench()
    if family == "preact":
        from robustbench.model_zoo.architectures.resnet import PreActBlockV2, PreActResNet

        arch = "preact-resnet-18"
        rb_model = PreActResNet(PreActBlockV2, [2, 2, 2, 2], num_classes=10, bn_before_fc=True)
    else:
        arch, rb_model = {"wrn": "wrn-10-1", "dm": "wrn-16-4-silu"}[family], _rb_reference(family)
    num_classes = 100 if family == "dm" else 10
    g = torch.Generator().manual_seed(3)
    for m in rb_model.modules():  # non-trivial BatchNorm statistics, so buffers are compared too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)

    ours = build_model(arch, num_classes=num_classes)  # RobustBench -> project
    ours.load_state_dict(rb_model.state_dict(), strict=True)
    assert _logit_diff(ours, rb_model) < 1e-5

    torch.manual_seed(7)
    fresh = build_model(arch, num_classes=num_classes)  # project -> RobustBench, via the export's constructor
    rb_twin = rbx.robustbench_arch(fresh).build()
    rb_twin.load_state_dict(rbx.robustbench_state_dict(fresh), strict=True)
    assert _logit_diff(rb_twin, fresh) < 1e-5 and _logit_diff(rb_twin, ours) > 1e-3

    converted, name = rbx.project_model_from_robustbench(rb_model)
    assert name == arch and _logit_diff(converted, rb_model) < 1e-5


def test_custom_normalisation_travels_in_the_constructor(tmp_path) -> None:
    model = build_model("wrn-16-4-silu", num_classes=10, mean=(0.1, 0.2, 0.3), std=(0.6, 0.7, 0.8))
    arch = rbx.robustbench_arch(model)
    assert "mean=(0.1, 0.2, 0.3), std=(0.6, 0.7, 0.8)" in arch.call_source()
    assert "CIFAR10_MEAN" in rbx.robustbench_arch(build_model("wrn-16-4-silu", num_classes=10)).call_source()
    path = rbx.save_weights(rbx.robustbench_state_dict(model), tmp_path / "w.pt")
    assert rbx.verify_export(model, arch, path, n=2) < 1e-5
    entry = tmp_path / "entry.py"
    entry.write_text(rbx.zoo_entry_source("X", arch, "cifar10", "Linf"))
    pasted = runpy.run_path(str(entry))["ENTRY"][1]["model"]()
    assert torch.equal(pasted.mean, model.mean) and torch.equal(pasted.std, model.std)


def test_unsupported_robustbench_variants_are_refused() -> None:
    rbx.install_robustbench()
    from robustbench.model_zoo.architectures.resnet import PreActBlock, PreActResNet
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    with pytest.raises(UserError, match="no counterpart"):
        rbx.project_model_from_robustbench(WideResNet(depth=10, widen_factor=1, sub_block1=True))
    v1 = PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes=10, bn_before_fc=True)  # same keys, other forward
    with pytest.raises(UserError, match="different logits"):
        rbx.project_model_from_robustbench(v1)
    with pytest.raises(UserError, match="wrn-D-W"):
        rbx.robustbench_arch(build_model("small-cnn", num_classes=10), "small-cnn")


def test_weight_choices_and_safetensors(tmp_path) -> None:
    from safetensors.torch import load_file, safe_open

    run, raw, avg = _make_run(tmp_path, "wrn-10-1", "cifar10", 10, seed=5)
    best = run / "checkpoints" / "best.pt"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    save_checkpoint({**state, "avg_model": raw.state_dict(), "epoch": 2}, best)
    for choice, expected in (("raw", raw), ("last", raw), ("best", raw), ("avg", avg)):
        out = tmp_path / f"out-{choice}"
        args = [str(run), "--weights", choice, "--out", str(out), "--allow-unevaluated", "--format", "safetensors",
                "--device", "cpu"]
        assert export_robustbench.main(args) == 0
        path = out / "models" / "cifar10" / "Linf" / f"{run.name}.safetensors"
        reference = _rb_reference("wrn")
        reference.load_state_dict(load_file(str(path)), strict=True)
        assert _logit_diff(reference, expected) < 1e-5, choice
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["constructor"].startswith("WideResNet(depth=10, widen_factor=1")
    info = json.loads((out / "model_info" / "cifar10" / "Linf" / f"{run.name}.json").read_text())
    assert info["clean_acc"] is None and rbx.validate_model_info(info, evaluated=False) == []
    assert rbx.validate_model_info(info) != []  # a submission needs the measured figures


def test_model_info_validation_names_each_bad_field() -> None:
    figures = rbx.Figures(clean=0.7385, autoattack=0.3918, n=10_000, eps=8 / 255, norm="Linf", source="x")
    info = rbx.build_model_info(rbx.ModelCard(name="GKL", footnote="50M generated images."), dataset="cifar100",
                                architecture="WideResNet-28-10", eps=8 / 255, norm="Linf", figures=figures)
    assert rbx.validate_model_info(info) == []
    assert (info["clean_acc"], info["autoattack_acc"], info["footnote"]) == ("73.85", "39.18", "50M generated images.")
    l2 = rbx.build_model_info(rbx.ModelCard(), dataset="cifar10", architecture="WideResNet-28-10", eps=0.5,
                              norm="L2", figures=figures)
    assert l2["eps"] == "0.5" and rbx.validate_model_info(l2) == []
    bad = {**info, "clean_acc": 73.85, "additional_data": "no", "number_forward_passes": 0, "eps": "eight"}
    del bad["venue"]
    problems = " | ".join(rbx.validate_model_info(bad))
    for field in ("clean_acc", "additional_data", "number_forward_passes", "eps", "'venue'"):
        assert field in problems


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_user_errors_are_one_line_and_write_nothing(tmp_path, capsys) -> None:
    run, _, _ = _make_run(tmp_path, "wrn-10-1", "cifar10", 10, seed=2)
    out = tmp_path / "out"
    assert export_robustbench.main([str(run), "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "eval_autoattack.py" in line and "--allow-unevaluated" in line

    _write_eval_report(run, [True, True], [True, False])  # evaluated the averaged weights
    assert export_robustbench.main([str(run), "--out", str(out), "--weights", "raw"]) == 2
    assert "other weights" in _one_error_line(capsys)
    assert export_robustbench.main([str(run), "--out", str(out), "--eps", "4/255"]) == 2
    assert "no standard AutoAttack (aa) result at eps 4/255" in _one_error_line(capsys)
    assert export_robustbench.main([str(run), "--out", str(out), "--model-name", "bad name/x"]) == 2
    assert "--model-name" in _one_error_line(capsys)

    small = tmp_path / "small.pt"
    torch.save(build_model("small-cnn", num_classes=10).state_dict(), small)
    args = [str(small), "--arch", "small-cnn", "--dataset", "cifar10", "--allow-unevaluated", "--out", str(out)]
    assert export_robustbench.main(args) == 2
    line = _one_error_line(capsys)
    assert "'small-cnn'" in line and "wrn-D-W" in line and "preact-resnet-18" in line
    assert not out.exists()


def test_logit_mismatch_fails_with_exit_1(runs, tmp_path, monkeypatch, capsys) -> None:
    run, _, _ = runs["dm"]
    monkeypatch.setattr(rbx.arch, "_statistic", lambda buffer, kind: (0.5, 0.5, 0.5))  # wrong normalisation
    _write_eval_report(run, [True], [False])
    args = [str(run), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert export_robustbench.main(args) == 1
    err = capsys.readouterr().err
    assert "export verification failed" in err and "limit 1e-05" in err


def test_claim_end_to_end_offline(runs, fake_cifar_root, tmp_path, monkeypatch, capsys) -> None:
    import eval_autoattack

    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    run, _, avg = runs["wrn"]
    data = ["--data-dir", str(fake_cifar_root), "--eps", "64/255", "--device", "cpu"]
    assert eval_autoattack.main([str(run), *data, "--attacks", "aa", "--quiet", "--out", str(run / "eval")]) == 0
    report = json.loads((run / "eval" / "report.json").read_text())
    out = tmp_path / "export"
    assert export_robustbench.main([str(run), *data, "--claim", "--out", str(out), "--batch-size", "20"]) == 0
    capsys.readouterr()

    claim = json.loads((out / "claim.json").read_text())["boards"]["Linf"]
    from torchvision.datasets import CIFAR10

    test = CIFAR10(str(fake_cifar_root), train=False)
    x = torch.tensor(test.data).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        own_clean = (avg(x).argmax(1) == torch.tensor(test.targets)).float().mean().item()
    assert claim["n_examples"] == len(test) == 20
    assert claim["clean_accuracy"] == pytest.approx(own_clean) == pytest.approx(report["clean_accuracy"])
    assert 0.0 <= claim["autoattack_accuracy"] <= claim["clean_accuracy"]
    assert claim["eps"] == "64/255" and "robust accuracy" in Path(claim["autoattack_log"]).read_text()
    info = json.loads((out / "model_info" / "cifar10" / "Linf" / f"{run.name}.json").read_text())
    assert (info["clean_acc"], info["autoattack_acc"]) == (claim["clean_acc"], claim["autoattack_acc"])
    assert json.loads((out / "export.json").read_text())["boards"]["Linf"]["model_info_figures"] == "claim"


def test_export_files_follow_the_umask(tmp_path) -> None:
    import os

    run, _, _ = _make_run(tmp_path, "wrn-10-1", "cifar10", 10, seed=4)
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        assert export_robustbench.main([str(run), "--out", str(out), "--allow-unevaluated", "--device", "cpu"]) == 0
    finally:
        os.umask(old)
    written = [out / "export.json", out / "zoo_entry.py", out / "model_info" / "cifar10" / "Linf" / f"{run.name}.json",
               out / "models" / "cifar10" / "Linf" / f"{run.name}.pt"]
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {p.name: 0o640 for p in written}


def test_a_run_without_averaged_weights_is_one_note_line(tmp_path, capsys) -> None:
    from checkpoints.io import load_checkpoint

    run, _, _ = _make_run(tmp_path, "wrn-10-1", "cifar10", 10, seed=5)
    last = run / "checkpoints" / "last.pt"
    save_checkpoint({**load_checkpoint(last), "avg_model": None}, last)
    assert export_robustbench.main([str(run), "--out", str(tmp_path / "out")]) == 2  # not evaluated yet
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Warning" not in "".join(err), err
    assert err[0] == "note: last.pt has no averaged weights (averaging off or not started): using the raw weights"
    assert err[1].startswith("error: no evaluation found")


def test_library_deprecations_are_not_printed_as_notes(capsys) -> None:
    export_robustbench._note("`torch.jit.interface` is deprecated", FutureWarning, "x.py", 1)
    export_robustbench._note("old", DeprecationWarning, "x.py", 1)
    export_robustbench._note("last.pt has no averaged weights", UserWarning, "x.py", 1)
    assert capsys.readouterr().err == "note: last.pt has no averaged weights\n"
