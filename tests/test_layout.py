"""The house rules of the code layout: floors, no import cycles, short files, no sys.path edits.

Floors (README "Code map"): a package may import its own modules and packages on lower floors
only. Every import counts, also the ones inside functions and the ones under ``if TYPE_CHECKING:``
(an annotation-only import is still a dependency: two modules that name each other's types are
one module in two files).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"errors": -1, "core": 0, "losses": 1, "models": 1, "data": 1, "attacks": 2, "checkpoints": 3,
          "training": 4, "evaluation": 5, "export": 6}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the floored packages."""
    found = {}
    for top in FLOORS:
        path = ROOT / f"{top}.py"
        if path.is_file():
            found[top] = path
        for file in sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else []:
            parts = file.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _imports(name: str, file: Path, known: set[str], typing: bool = True) -> set[str]:
    """Project modules ``name`` imports (absolute and relative, at any depth of the file; those under
    ``if TYPE_CHECKING:`` too unless ``typing`` is False)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(file.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and _is_type_checking(block.test) for n in ast.walk(block)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if not typing and id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the module; ``from pkg import name`` the package's __init__
            subs = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t for t in subs if t in known] or [base]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, file, set(mods)) for name, file in mods.items()}


def test_no_package_imports_a_higher_floor():
    bad = [f"{a} imports {b}" for a, deps in _graph().items() for b in deps
           if a.split(".")[0] != b.split(".")[0] and FLOORS[b.split(".")[0]] >= FLOORS[a.split(".")[0]]]
    assert not bad, bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycles_not_even_for_annotations():
    cycles = _cycles(_graph())
    assert not cycles, cycles


def test_the_cycle_checker_sees_a_circle_made_under_type_checking(tmp_path):
    known = {"evaluation.spec", "evaluation.runners"}
    spec, runners = tmp_path / "spec.py", tmp_path / "runners.py"
    spec.write_text("from . import runners\n")
    runners.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .spec import AttackSpec\n")
    graph = {"evaluation.spec": _imports("evaluation.spec", spec, known),
             "evaluation.runners": _imports("evaluation.runners", runners, known)}
    assert _cycles(graph) == [["evaluation.runners", "evaluation.spec", "evaluation.runners"]]
    assert _imports("evaluation.runners", runners, known, typing=False) == set()


def test_the_floor_checker_sees_lazy_and_relative_imports(tmp_path):
    known = {"attacks.autoattack", "attacks.rb_bridge", "checkpoints.io", "attacks"}
    src = tmp_path / "autoattack.py"
    src.write_text("from . import rb_bridge\nfrom attacks import pgd\n\ndef f():\n"
                   "    from checkpoints.io import load_checkpoint\n")
    assert _imports("attacks.autoattack", src, known) == {"attacks", "attacks.rb_bridge", "checkpoints.io"}
    with open(src, "a") as f:
        f.write("if typing.TYPE_CHECKING:\n    from training import trainer\n")
    assert _imports("attacks.autoattack", src, known | {"training.trainer"}) == {"attacks", "attacks.rb_bridge",
                                                                              "checkpoints.io", "training.trainer"}


def _sources() -> list[Path]:
    return [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]


def test_no_file_over_400_lines_besides_tests():
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_script_edits_sys_path():
    edits = [str(p.relative_to(ROOT)) for p in _sources() if "sys.path.insert" in p.read_text()
             or "sys.path[0] =" in p.read_text()]
    assert not edits, edits
