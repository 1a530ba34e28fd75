"""``import autoattack`` and ``import robustbench`` in an environment with PyPI's ``pyautoattack`` only.

The bridge itself is the small distribution in ``compat/`` (``gkl_at_compat``), which the install
step (``pip install -r requirements.txt``, ``make install``) puts into the environment: a finder at
the end of ``sys.meta_path``, registered at interpreter start-up, that provides ``autoattack`` (an
alias over pyautoattack with the git package's API) and ``pkg_resources`` only where the real ones
are missing, so any script or notebook can ``import robustbench``. :func:`install` makes sure it is
registered also where the distribution is not installed (a checkout used with another Python), from
the repository's copy of the same code.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Optional

from errors import UserError

_COMPAT = Path(__file__).resolve().parent.parent / "compat" / "gkl_at_compat"


def compat() -> types.ModuleType:
    """The ``gkl_at_compat`` module: the installed one, else the repository's copy (then imported as such)."""
    try:
        import gkl_at_compat
    except ImportError:
        spec = importlib.util.spec_from_file_location("gkl_at_compat", _COMPAT / "__init__.py",
                                                      submodule_search_locations=[str(_COMPAT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["gkl_at_compat"] = module
        spec.loader.exec_module(module)
        return module
    return gkl_at_compat


def install() -> None:
    """Make ``import autoattack`` and ``import robustbench`` work; safe to call any number of times."""
    bridge = compat()
    bridge.register()
    if not bridge.uses_git_autoattack() and importlib.util.find_spec("pyautoattack") is None:
        raise UserError("neither the git `autoattack` nor `pyautoattack` is installed; "
                        "fix: pip install pyautoattack")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools 80 warns that pkg_resources is deprecated
        importlib.import_module("pkg_resources")
    importlib.import_module("autoattack")


def uses_git_autoattack() -> bool:
    """True when ``autoattack`` is (or would be) the git package rather than the alias over pyautoattack."""
    return compat().uses_git_autoattack()


def autoattack_implementation() -> dict[str, Optional[str]]:
    """Which AutoAttack ``autoattack_class`` runs: ``package`` (``pyautoattack`` or the git ``autoattack``),
    ``version``, ``source`` (``pypi``, ``git``, ...), ``commit``, ``url``, ``module_file``, ``summary``."""
    bridge = compat()
    bridge.register()
    if hasattr(bridge, "implementation"):
        return bridge.implementation()
    # an installed gkl_at_compat older than the repository's (make install updates it): the repository's code
    spec = importlib.util.spec_from_file_location("_gkl_at_compat_provenance", _COMPAT / "provenance.py")
    provenance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(provenance)
    return provenance.implementation(alias=not bridge.uses_git_autoattack())


def autoattack_class() -> type:
    """``autoattack.AutoAttack``: the git package's, or the alias's with the same signature."""
    install()
    return importlib.import_module("autoattack").AutoAttack
