"""The robustbench bridge: `import robustbench` and `robustbench.eval.benchmark` work offline."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from attacks import rb_bridge

N_POINTS = 16


def test_attacks_package_does_not_import_robustbench() -> None:
    code = "import sys, attacks; assert 'robustbench' not in sys.modules and 'autoattack' not in sys.modules"
    import subprocess

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_install_is_idempotent_and_robustbench_imports() -> None:
    rb_bridge.install()
    first = sys.modules["autoattack"]
    rb_bridge.install()
    assert sys.modules["autoattack"] is first
    import autoattack
    from autoattack.state import EvaluationState

    robustbench = importlib.import_module("robustbench")
    wide_resnet = importlib.import_module("robustbench.model_zoo.architectures.wide_resnet")
    assert callable(robustbench.benchmark) and hasattr(wide_resnet, "WideResNet")
    assert hasattr(autoattack, "AutoAttack") and hasattr(EvaluationState, "from_disk")


def test_resource_filename_shim_matches_module_directory() -> None:
    import robustbench.loaders as loaders  # noqa: F401  (after install, from the test above or here)

    path = rb_bridge._resource_filename("robustbench.loaders", "loaders.py")
    assert Path(path).is_file()


@pytest.fixture()
def patched_benchmark(monkeypatch: pytest.MonkeyPatch, digits_test):
    rb_bridge.install()
    rb_eval = importlib.import_module("robustbench.eval")
    x, y = digits_test[0][:N_POINTS], digits_test[1][:N_POINTS]

    def fake_load_clean_dataset(dataset, n_examples, data_dir, prepr):
        return x[:n_examples].clone(), y[:n_examples].clone()

    monkeypatch.setattr(rb_eval, "load_clean_dataset", fake_load_clean_dataset)
    return rb_eval.benchmark, x, y


def test_benchmark_runs_through_bridge(patched_benchmark, digits_model, tmp_path: Path) -> None:
    benchmark, x, y = patched_benchmark
    with torch.no_grad():
        expected_clean = (digits_model(x).argmax(1) == y).float().mean().item()
    state_path = tmp_path / "aa_state.json"
    log_path = tmp_path / "aa.log"
    # eps large enough that APGD-CE breaks every point: the rest of the standard version is skipped.
    clean, robust = benchmark(digits_model, n_examples=N_POINTS, dataset="cifar10", threat_model="Linf",
                              eps=64 / 255, batch_size=N_POINTS, device=torch.device("cpu"),
                              log_path=str(log_path), aa_state_path=state_path)
    assert clean == pytest.approx(expected_clean)
    assert robust == 0.0 < clean
    assert state_path.is_file() and "robust accuracy" in log_path.read_text()
    again = benchmark(digits_model, n_examples=N_POINTS, dataset="cifar10", threat_model="Linf", eps=64 / 255,
                      batch_size=N_POINTS, device=torch.device("cpu"), aa_state_path=state_path)
    assert again == (clean, robust)  # resumed from the finished state file: nothing left to run


def test_git_style_autoattack_signature(digits_model, digits_test) -> None:
    rb_bridge.install()
    from autoattack import AutoAttack

    x, y = digits_test[0][:8], digits_test[1][:8]
    adversary = AutoAttack(digits_model, norm="L2", eps=0.5, version="custom", attacks_to_run=["apgd-ce"],
                           device="cpu", verbose=False, seed=0)
    adversary.apgd.n_restarts = 1
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, bs=8, return_labels=True)
    assert x_adv.shape == x.shape and y_adv.shape == y.shape
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    with pytest.raises(ValueError):
        AutoAttack(digits_model, version="standard", attacks_to_run=["apgd-ce"], device="cpu")


def test_bridge_resumes_a_partial_state_file(digits_model, digits_test, tmp_path: Path) -> None:
    rb_bridge.install()
    import json

    from autoattack import AutoAttack
    from autoattack.state import EvaluationState

    x, y = digits_test[0][:16], digits_test[1][:16]
    path = tmp_path / "state.json"

    def adversary() -> AutoAttack:
        adversary = AutoAttack(digits_model, norm="L2", eps=0.5, version="custom",
                               attacks_to_run=["apgd-ce", "apgd-dlr"], device="cpu", verbose=False, seed=0)
        adversary.apgd.n_restarts, adversary.apgd.n_iter = 1, 25  # test time: a short APGD
        return adversary

    adversary().run_standard_evaluation(x, y, bs=16, state_path=path)
    with torch.no_grad():
        clean_flags = digits_model(x).argmax(1) == y
    saved = json.loads(path.read_text())  # rewind to "interrupted right after the clean pass"
    saved["_run_attacks"], saved["_robust_flags"] = [], clean_flags.tolist()
    path.write_text(json.dumps(saved))

    x_adv, y_adv = adversary().run_standard_evaluation(x, y, bs=16, state_path=path, return_labels=True)
    state = EvaluationState.from_disk(path)
    assert state.run_attacks == {"apgd-ce", "apgd-dlr"}
    robust_flags = state.robust_flags.bool()
    broken = clean_flags & ~robust_flags
    assert not (robust_flags & ~clean_flags).any() and broken.any()
    with torch.no_grad():
        assert (digits_model(x_adv[broken]).argmax(1) != y[broken]).all()
    assert (y_adv[broken] != y[broken]).all()
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
