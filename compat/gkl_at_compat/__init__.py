"""``import robustbench`` without the git-only ``autoattack`` package and without ``pkg_resources``.

robustbench 1.1.1 imports ``autoattack.AutoAttack`` and ``autoattack.state.EvaluationState`` from
fra31/auto-attack, which is not on PyPI, and ``pkg_resources``, which setuptools >= 81 no longer
ships. :func:`register` appends one finder to the END of ``sys.meta_path``: the import system asks it
only for modules no other finder found, so a real ``autoattack`` or ``pkg_resources`` on the path
always wins. Where they are missing it provides

* ``autoattack``: PyPI's ``pyautoattack`` under the git package's name and API (see :mod:`.alias`), an
  honest module: ``__file__`` is the alias's source file, ``__version__`` pyautoattack's version, and
  :func:`implementation` says which AutoAttack (package, version, PyPI or git) ``import autoattack`` gives;
* ``pkg_resources``: ``resource_filename``, the one function robustbench uses.

``gkl_at_compat.pth`` calls :func:`register` at interpreter start-up, so this module imports only the
standard library (and nothing of the GKL-AT project: any script or notebook in the environment works).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["register", "registered", "uses_git_autoattack", "implementation", "BRIDGE_FLAG"]
BRIDGE_FLAG = "_gkl_at_bridge"  # set on the modules this package makes up
_ALIAS_FILE = str(Path(__file__).resolve().parent / "alias.py")


class _AliasLoader(importlib.abc.Loader):
    """Fills the ``autoattack`` package with pyautoattack's classes and modules (see :mod:`.alias`)."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return None  # the default module, with __path__ = [] (a package)

    def exec_module(self, module: types.ModuleType) -> None:
        from . import alias

        alias.fill(module)


def _resource_filename(module_name: str, resource: str) -> str:
    """``pkg_resources.resource_filename``: ``resource`` relative to the module's folder on disk."""
    module = importlib.import_module(module_name)
    return str(Path(module.__file__).parent / resource)


class _PkgResourcesLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__doc__ = "The one function of pkg_resources robustbench calls (setuptools >= 81 has none)."
        module.resource_filename = _resource_filename  # type: ignore[attr-defined]
        setattr(module, BRIDGE_FLAG, True)


class CompatFinder(importlib.abc.MetaPathFinder):
    """Provides ``autoattack`` and ``pkg_resources`` when asked, i.e. when no earlier finder has them."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[types.ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname == "autoattack":
            if importlib.util.find_spec("pyautoattack") is None:
                return None  # the usual "No module named 'autoattack'"
            # origin: the alias's source file becomes the module's __file__ (and shows in its repr)
            spec = importlib.machinery.ModuleSpec(fullname, _AliasLoader(), origin=_ALIAS_FILE, is_package=True)
            spec.has_location = True
            return spec
        if fullname == "pkg_resources":
            return importlib.machinery.ModuleSpec(fullname, _PkgResourcesLoader())
        return None


def registered() -> bool:
    """Whether a finder of this package is on ``sys.meta_path``."""
    return any(type(f).__name__ == CompatFinder.__name__ and type(f).__module__ == __name__ for f in sys.meta_path)


def register() -> None:
    """Append the finder to ``sys.meta_path`` (once; safe to call any number of times)."""
    if not registered():
        sys.meta_path.append(CompatFinder())


def uses_git_autoattack() -> bool:
    """True when ``autoattack`` is (or would be) the git package rather than the alias over pyautoattack."""
    module = sys.modules.get("autoattack")
    if module is not None:
        return not getattr(module, BRIDGE_FLAG, False)
    spec = importlib.util.find_spec("autoattack")
    return spec is not None and not isinstance(spec.loader, _AliasLoader)


def implementation() -> dict[str, Optional[str]]:
    """Which AutoAttack ``import autoattack`` gives here: ``package``, ``version``, ``source`` (``pypi`` or
    ``git``, ...), ``commit``, ``url``, ``module_file`` and a one-line ``summary`` (nothing is imported)."""
    from .provenance import implementation as _implementation

    return _implementation(alias=not uses_git_autoattack())
