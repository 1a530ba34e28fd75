"""One intact environment, an honest `autoattack`, and the project installable with its console commands.

- Every file of the installed robustbench is robustbench's (pip's RECORD: paths and hashes), no other
  distribution claims a file another one claims (torchattacks' wheel once overwrote robustbench/), and
  `robustbench.eval.benchmark` imports.
- The compat `autoattack` alias is an honest module (`__file__`, `__version__`) and the AutoAttack
  behind it (package, version, PyPI or git) is named, also in report.md / report.json.
- `make install` installs the clone editable with the gkl-* commands; `pip wheel .` builds a wheel whose
  generic top-level names live in a folder of their own.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMMANDS = {"gkl-train": "train_at:main", "gkl-eval": "eval_autoattack:main", "gkl-export": "export_robustbench:main",
            "gkl-compare": "evaluation.compare:main", "gkl-submit": "submit:main"}


# ------------------------------------------------------------------------------------------- file ownership
def _digest(path: Path, mode: str) -> str:
    return base64.urlsafe_b64encode(hashlib.new(mode, path.read_bytes()).digest()).rstrip(b"=").decode()


def installed() -> list[importlib.metadata.Distribution]:
    """The distributions installed in this interpreter's site-packages (not the copies that setuptools
    vendors in its own folder and puts on sys.path when imported)."""
    return list(importlib.metadata.distributions(path=site.getsitepackages()))


def owners_of_files(dists: list[importlib.metadata.Distribution]) -> dict[str, list[str]]:
    """Each file any RECORD lists (normalised absolute path) -> the distributions listing it."""
    owners: dict[str, list[str]] = {}
    for dist in dists:
        name = dist.metadata["Name"]  # parsed anew at each access
        for file in dist.files or []:
            owners.setdefault(os.path.normpath(file.locate()), []).append(name)
    return owners


def ownership_problems(dists: list[importlib.metadata.Distribution], package: str) -> list[str]:
    """What is wrong with ``package``'s files: a file another distribution also claims, a file whose
    bytes differ from the hash in the owner's RECORD, a file on disk in its folder that no RECORD lists."""
    owners = owners_of_files(dists)
    problems = [f"{path} is claimed by {' and '.join(names)}" for path, names in owners.items()
                if len(names) > 1 and package in names]
    owner = next(d for d in dists if d.metadata["Name"] == package)
    folders = set()
    for file in owner.files or []:
        path = Path(os.path.normpath(file.locate()))
        if file.parts[0] == package:
            folders.add(path.parent)
        if file.hash is not None and path.is_file() and _digest(path, file.hash.mode) != file.hash.value:
            problems.append(f"{path} differs from {package}'s RECORD (overwritten by another distribution?)")
    listed = {p for p, names in owners.items() if package in names}
    for folder in folders:
        problems += [f"{p} in {package}'s folder is in no RECORD of {package}" for p in folder.iterdir()
                     if p.is_file() and str(p) not in listed and p.suffix != ".pyc"]
    return problems


def test_every_file_of_robustbench_is_robustbench_s_own_and_benchmark_imports() -> None:
    problems = ownership_problems(installed(), "robustbench")
    fix = ("fix: `make install` (it removes torchattacks and reinstalls robustbench), or rm -rf .venv && make "
           "install")
    assert not problems, "\n".join(problems[:10] + [fix])
    from attacks import rb_bridge

    rb_bridge.install()
    from robustbench.eval import benchmark
    from robustbench.utils import load_model

    assert callable(benchmark) and callable(load_model)


def test_no_two_distributions_claim_one_file() -> None:
    shared = {p: names for p, names in owners_of_files(installed()).items() if len(set(names)) > 1}
    assert not shared, list(shared.items())[:10]


def _fake_distribution(site: Path, name: str, files: dict[str, bytes], record_hashes: bool = True) -> None:
    """A distribution as pip installs it: its files and a dist-info whose RECORD lists them."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = []
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{rel},sha256={digest},{len(data)}" if record_hashes else f"{rel},,")
    (info / "RECORD").write_text("\n".join(lines + [f"{info.name}/RECORD,,"]) + "\n")


def test_the_ownership_check_finds_an_overwritten_and_a_foreign_file(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _fake_distribution(site, "robustbench", {"robustbench/__init__.py": b"", "robustbench/eval.py": b"good\n"})
    dists = list(importlib.metadata.distributions(path=[str(site)]))
    assert ownership_problems(dists, "robustbench") == []
    # torchattacks 3.5.1's wheel: its own robustbench/eval.py (written over the real one) and an extra file
    _fake_distribution(site, "intruder", {"robustbench/eval.py": b"old copy\n", "robustbench/extra.py": b""})
    dists = list(importlib.metadata.distributions(path=[str(site)]))
    problems = "\n".join(ownership_problems(dists, "robustbench"))
    assert "eval.py is claimed by" in problems and "differs from robustbench's RECORD" in problems
    (site / "robustbench" / "stray.py").write_text("")
    dists = [d for d in importlib.metadata.distributions(path=[str(site)]) if d.metadata["Name"] == "robustbench"]
    problems = "\n".join(ownership_problems(dists, "robustbench"))
    assert "stray.py in robustbench's folder is in no RECORD" in problems and "extra.py" in problems


# ------------------------------------------------------------------------------------------- honest autoattack
def _python(code: str, cwd: Path, pythonpath: str | None = None) -> str:
    """``code`` in a fresh interpreter of this environment, outside the repository; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_autoattack_alias_is_an_honest_module_and_the_project_imports_from_the_clone(tmp_path: Path) -> None:
    code = ("import inspect, json, autoattack, gkl_at_compat, losses, train_at, export\n"
            "print(json.dumps([autoattack.__file__, inspect.getsourcefile(autoattack), autoattack.__version__,\n"
            "    gkl_at_compat.implementation(), losses.__file__, train_at.__file__, export.__file__]))")
    file, source, version, info, *project = json.loads(_python(code, cwd=tmp_path))
    alias = Path(importlib.util.find_spec("gkl_at_compat").origin).parent / "alias.py"
    assert file == source == str(alias) and "class GitStyleAutoAttack" in Path(file).read_text()
    assert version == importlib.metadata.version("pyautoattack")
    assert (info["package"], info["version"], info["source"]) == ("pyautoattack", version, "pypi")
    assert info["summary"] == f"pyautoattack {version} (PyPI) through gkl_at_compat's autoattack alias"
    # the editable install: the clone's own files, from any folder
    assert [Path(p) for p in project] == [ROOT / "losses" / "__init__.py", ROOT / "train_at.py",
                                          ROOT / "export" / "__init__.py"]


def test_a_git_autoattack_is_named_with_its_commit(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    installed = tmp_path / "installed"  # pip install git+https://github.com/fra31/auto-attack
    _fake_distribution(installed, "autoattack", {"autoattack/__init__.py": b"class AutoAttack:\n    pass\n",
                                                 "autoattack/state.py": b"class EvaluationState:\n    pass\n"})
    direct = {"url": "https://github.com/fra31/auto-attack", "vcs_info": {"vcs": "git", "commit_id": commit}}
    (installed / "autoattack-1.0.dist-info" / "direct_url.json").write_text(json.dumps(direct))
    clone = tmp_path / "clone"  # a clone on PYTHONPATH, no installation metadata
    (clone / "autoattack").mkdir(parents=True)
    (clone / "autoattack" / "__init__.py").write_text("")
    (clone / ".git" / "refs" / "heads").mkdir(parents=True)
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/master\n")
    (clone / ".git" / "refs" / "heads" / "master").write_text(commit[::-1] + "\n")
    code = "import gkl_at_compat; print(gkl_at_compat.implementation()['summary'])"
    assert _python(code, tmp_path, str(installed)).strip() == \
        f"autoattack 1.0 (git https://github.com/fra31/auto-attack@{commit[:12]})"
    assert _python(code, tmp_path, str(clone)).strip() == \
        f"autoattack (git {clone / 'autoattack' / '__init__.py'}@{commit[::-1][:12]})"


def test_reports_name_the_autoattack_that_ran(tmp_path: Path) -> None:
    import torch

    from attacks import rb_bridge
    from evaluation.report import environment_info, write_reports
    from evaluation.suite import AttackResult, SuiteResult, SuiteSettings

    for attacks, shown in ((["aa"], True), (["pgd10"], False)):
        settings = SuiteSettings.build([8 / 255], attacks)
        result = SuiteResult(settings, torch.zeros(4, dtype=torch.long), torch.tensor([True, True, False, True]))
        result.results[(settings.eps[0], attacks[0])] = AttackResult(attacks[0], settings.eps[0],
                                                                     torch.tensor([True, False, False, True]), 3, 0.1, 0)
        meta = {"data": {"dataset": "digits", "split": "test", "n": 4}, "environment": environment_info()}
        out = tmp_path / attacks[0]
        write_reports(result, out, meta)
        summary = rb_bridge.autoattack_implementation()["summary"]
        assert json.loads((out / "report.json").read_text())["environment"]["autoattack"]["summary"] == summary
        assert (f"AutoAttack: {summary}." in (out / "report.md").read_text()) is shown


# ------------------------------------------------------------------------------------------- installable
def test_the_console_commands_are_installed_and_run() -> None:
    dist = importlib.metadata.distribution("gkl-at")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    assert direct.get("dir_info", {}).get("editable") and direct["url"] == ROOT.as_uri(), \
        "the project is not installed editable from this clone: run make install"
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == COMMANDS == PYPROJECT["project"]["scripts"]
    bin_dir = Path(sys.executable).parent
    for ep in dist.entry_points:
        assert (bin_dir / ep.name).is_file(), f"{ep.name} is not in {bin_dir}: run make install"
        assert callable(ep.load()), ep.name
    proc = subprocess.run([str(bin_dir / "gkl-eval"), "--help"], capture_output=True, text=True, cwd="/", timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: gkl-eval"), proc.stderr[-2000:]


def test_requirements_and_pyproject_name_the_same_distributions() -> None:
    def names(lines: list[str]) -> set[str]:
        found = set()
        for line in lines:
            line = line.split("#")[0].strip()
            if line and not line.startswith(("-", ".", "/")):
                found.add(line.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower())
        return found

    required = names((ROOT / "requirements.txt").read_text().splitlines())
    declared = names(PYPROJECT["project"]["dependencies"])
    assert required == declared, f"only in requirements.txt: {required - declared}; only in pyproject.toml: " \
                                 f"{declared - required} (list each runtime dependency in both)"


def test_pip_wheel_builds_a_wheel_that_owns_no_generic_top_level_name(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("gkl_at-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"gkl_at_modules", "gkl_at_modules.pth", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    hook = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["custom"]
    for entry in hook["include"]:
        assert any(n == f"gkl_at_modules/{entry}" or n.startswith(f"gkl_at_modules/{entry}/") for n in names), entry
    assert not [n for n in names if "__pycache__" in n or n.startswith("gkl_at_modules/tests")]

    site = tmp_path / "site"  # installed as a site folder (processes the .pth), away from the clone
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = ("import site, sys; sys.path[:] = [p for p in sys.path if p != %r]; site.addsitedir(%r)\n"
            "import losses, training.config as c\n"
            "print(losses.__file__); print(sorted(p.stem for p in c.CONFIG_DIR.glob('*.yaml')) == %r)"
            % (str(ROOT), str(site), sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))))
    module_file, configs = _python(code, cwd=tmp_path).split()
    assert module_file == str(site / "gkl_at_modules" / "losses" / "__init__.py") and configs == "True"


def test_the_library_doc_loads_a_checkpoint_in_a_user_script(tmp_path: Path) -> None:
    """docs/LIBRARY.md's example, run as written in a folder of the user's, on a run folder of the trainer's format."""
    import re

    import torch

    from checkpoints.io import save_checkpoint
    from models import build_model

    text = (ROOT / "docs" / "LIBRARY.md").read_text()
    example = re.search(r"## Load a checkpoint in your script\s+```python\n(.*?)```", text, re.S).group(1)
    torch.manual_seed(0)
    raw, avg = build_model("tiny-cnn", num_classes=10), build_model("tiny-cnn", num_classes=10)
    save_checkpoint({"format": "gkl-at/1", "model": raw.state_dict(), "avg_model": avg.state_dict(), "arch": "tiny-cnn",
                     "num_classes": 10, "dataset": "digits", "epoch": 3, "global_step": 30},
                    tmp_path / "runs" / "quickstart" / "gkl" / "checkpoints" / "last.pt")
    check = ("\ntorch.manual_seed(0); x = torch.rand(4, 3, 32, 32)\n"
             "print(model.training, ','.join(repr(v) for v in model(x).flatten().tolist()))")
    lines = _python(example + check, cwd=tmp_path).splitlines()
    assert lines[0] == "tiny-cnn digits epoch 3 avg weights"
    assert re.fullmatch(r"tensor\(\[\d, \d, \d, \d\]\)", lines[1])
    training, logits = lines[2].split()
    logits = torch.tensor([float(v) for v in logits.split(",")])
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert training == "False" and (logits - avg.eval()(x).flatten()).abs().max() < 1e-4
        assert (logits - raw.eval()(x).flatten()).abs().max() > 1e-3  # the averaged weights, not the raw ones
