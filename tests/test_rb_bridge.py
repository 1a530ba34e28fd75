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

    path = rb_bridge.compat()._resource_filename("robustbench.loaders", "loaders.py")
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


# --------------------------------------------------------------------------------------- the compat distribution
ROOT = Path(__file__).resolve().parents[1]
_HEAVY = ("torch", "pyautoattack", "autoattack", "robustbench", "pkg_resources")


def _python(code: str, cwd: Path, pythonpath: str | None = None, flags: tuple[str, ...] = ()) -> str:
    """Run ``code`` in a fresh interpreter of this environment, outside the repository; its stdout."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_robustbench_imports_in_a_fresh_interpreter_with_no_preparation(tmp_path: Path) -> None:
    code = ("import sys; print(sorted(m for m in %r if m in sys.modules))\n"
            "import robustbench\nfrom robustbench import load_model\nfrom robustbench.eval import benchmark\n"
            "import autoattack, autoattack.state, gkl_at_compat\n"
            "print(autoattack._gkl_at_bridge, gkl_at_compat.uses_git_autoattack(), 'errors' in sys.modules)\n"
            "print(robustbench.eval.AutoAttack.__module__, robustbench.eval.EvaluationState.__module__)" % (_HEAVY,))
    lines = _python(code, cwd=tmp_path).splitlines()
    assert lines[0] == "[]"  # the start-up hook only appends a finder: nothing heavy is imported
    assert lines[1] == "True False False"  # the alias, and nothing of this project (no `errors` module)
    assert lines[2] == "gkl_at_compat.alias autoattack.state"


def test_a_git_autoattack_on_the_path_wins_over_the_alias(tmp_path: Path) -> None:
    fake = tmp_path / "site" / "autoattack"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("GIT = True\n\nclass AutoAttack:\n    pass\n")
    (fake / "state.py").write_text("class EvaluationState:\n    pass\n")
    code = ("import autoattack, robustbench.eval, gkl_at_compat\n"
            "print(autoattack.GIT, robustbench.eval.AutoAttack is autoattack.AutoAttack, "
            "gkl_at_compat.uses_git_autoattack(), hasattr(autoattack, '_gkl_at_bridge'))")
    assert _python(code, cwd=tmp_path, pythonpath=str(tmp_path / "site")).split() == ["True"] * 3 + ["False"]


def test_pkg_resources_stand_in_where_setuptools_lacks_it(tmp_path: Path) -> None:
    code = ("import sys, importlib.machinery as m\n"
            "class Hide(m.PathFinder):  # setuptools >= 81: the path holds no pkg_resources\n"
            "    @classmethod\n"
            "    def find_spec(cls, name, path=None, target=None):\n"
            "        return None if name == 'pkg_resources' else super().find_spec(name, path, target)\n"
            "sys.meta_path[sys.meta_path.index(m.PathFinder)] = Hide\n"
            "import robustbench.loaders, pkg_resources\n"
            "print(pkg_resources._gkl_at_bridge, pkg_resources.resource_filename('robustbench.loaders', 'x.json') "
            "== robustbench.loaders.__file__.rsplit('/', 1)[0] + '/x.json')")
    assert _python(code, cwd=tmp_path).split() == ["True", "True"]


def test_the_bridge_uses_the_repository_copy_where_the_distribution_is_absent(tmp_path: Path) -> None:
    import site

    code = ("import sys\n"
            "class Absent:\n"
            "    @staticmethod\n"
            "    def find_spec(name, path=None, target=None):\n"
            "        if name == 'gkl_at_compat':\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Absent)\n"
            "from attacks import rb_bridge\n"
            "rb_bridge.install()\n"
            "import robustbench.eval\n"
            "print(rb_bridge.compat().__file__, robustbench.eval.AutoAttack is rb_bridge.autoattack_class())")
    # -S: no .pth start-up hook; the site-packages folders come back through PYTHONPATH
    path = ":".join([str(ROOT), *site.getsitepackages()])
    compat_file, same = _python(code, cwd=tmp_path, pythonpath=path, flags=("-S",)).split()
    assert compat_file == str(ROOT / "compat" / "gkl_at_compat" / "__init__.py") and same == "True"


def test_a_change_to_the_compat_sources_reinstalls_it(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt", "pyproject.toml", "hatch_build.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "compat", tmp_path / "compat")

    def stamp() -> str:
        out = subprocess.run(["make", "-n", "install"], cwd=tmp_path, capture_output=True, text=True, check=True)
        return [w for w in out.stdout.split() if ".installed-" in w][-1]  # the touched stamp

    first = stamp()
    with open(tmp_path / "compat" / "gkl_at_compat" / "alias.py", "a") as f:
        f.write("# changed\n")
    second = stamp()
    with open(tmp_path / "pyproject.toml", "a") as f:  # the project's own packaging (pip install -e .)
        f.write("# changed\n")
    assert len({first, second, stamp()}) == 3
    assert "./compat" in (ROOT / "requirements.txt").read_text().split()
