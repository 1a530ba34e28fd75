"""``autoattack`` made of PyPI's ``pyautoattack``, with the git package's constructor and calls.

Differences bridged: git takes ``attacks_to_run``/``verbose``/``log_path``/``is_tf_model`` and
``run_standard_evaluation(x, y, bs=, return_labels=, state_path=)`` returning ``x_adv``; pyautoattack
takes ``attacks``, logs to the ``auto-attack`` logger and returns ``(x_adv, y_adv)``. Its
``EvaluationState.from_disk`` gives float robust flags, as robustbench 1.1.1 averages them.
"""
from __future__ import annotations

import ast
import importlib
import importlib.machinery
import json
import logging
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pyautoattack
import torch
from pyautoattack import AutoAttack as _PyAutoAttack
from pyautoattack import state as _py_state

from . import BRIDGE_FLAG

# Submodules of the git package that have a pure-PyTorch twin in pyautoattack.
SUBMODULES = ("autopgd_base", "fab_pt", "fab_projections", "square", "checks", "other_utils")


def fill(module: types.ModuleType) -> None:
    """Make ``module`` (the ``autoattack`` package) the alias; its submodules go into ``sys.modules``."""
    module.__doc__ = "pyautoattack under the git package's name and API (gkl_at_compat)."
    module.__version__ = pyautoattack.__version__  # type: ignore[attr-defined]
    module.AutoAttack = GitStyleAutoAttack  # type: ignore[attr-defined]
    setattr(module, BRIDGE_FLAG, True)
    for name in SUBMODULES:
        sub = importlib.import_module(f"pyautoattack.{name}")
        setattr(module, name, sub)
        sys.modules[f"autoattack.{name}"] = sub
    module.state = _state_module()  # type: ignore[attr-defined]
    sys.modules["autoattack.state"] = module.state


@contextmanager
def log_to(logger: logging.Logger, to_stdout: bool, log_path: Optional[str | Path]) -> Iterator[None]:
    """Send ``logger``'s records (DEBUG and up) to stdout and/or a file for the duration of a run."""
    handlers: list[logging.Handler] = []
    if to_stdout:
        handlers.append(logging.StreamHandler(sys.stdout))
    if log_path is not None:
        handlers.append(logging.FileHandler(log_path, mode="a"))
    old_level = logger.level
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    if handlers:
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(old_level)


class EvaluationState(_py_state.EvaluationState):
    """pyautoattack's state whose ``from_disk`` gives float robust flags.

    robustbench 1.1.1 reports ``from_disk(path).robust_flags.mean()``, which torch refuses for bool.
    """

    @classmethod
    def from_disk(cls, path: Path) -> "EvaluationState":
        loaded = with_sets(super().from_disk(path))
        loaded._robust_flags = loaded._robust_flags.float()
        return loaded


EvaluationState.__module__ = "autoattack.state"


def _state_module() -> types.ModuleType:
    module = types.ModuleType("autoattack.state", _py_state.__doc__)
    module.__spec__ = importlib.machinery.ModuleSpec("autoattack.state", None)
    module.EvaluationState = EvaluationState  # type: ignore[attr-defined]
    return module


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class GitStyleAutoAttack(_PyAutoAttack):
    """pyautoattack's ``AutoAttack`` with the git package's constructor and evaluation signatures."""

    def __init__(self, model: torch.nn.Module, norm: str = "Linf", eps: float = 0.3,
                 seed: int | None = None, verbose: bool = True, attacks_to_run: list[str] | None = None,
                 version: str = "standard", is_tf_model: bool = False,
                 device: torch.device | str | None = None, log_path: str | None = None) -> None:
        if is_tf_model:
            raise ValueError("is_tf_model=True is not supported by the pyautoattack alias of autoattack; "
                             "pass a PyTorch model or install the git autoattack package")
        attacks = list(attacks_to_run) if attacks_to_run else None
        super().__init__(model, attacks=attacks, device=device or _default_device(), eps=eps,
                         norm=norm, seed=seed, version=version)
        self.show_progress = verbose
        self.log_path = log_path

    def run_standard_evaluation(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250,
                                return_labels: bool = False, state_path: str | Path | None = None,
                                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the configured attacks; ``x_adv`` (and ``y_adv`` with ``return_labels``).

        An existing ``state_path`` is resumed here: pyautoattack 0.2.0's own resume path reads
        ``y_adv`` before assigning it. Resumed runs return examples from this run only, as git does.
        """
        x_orig = x_orig.contiguous()  # APGD .view()s tensors made with zeros_like(x)
        path = Path(state_path) if state_path is not None else None
        with log_to(self.logger, self.show_progress, self.log_path):
            if path is not None and _has_progress(path):
                x_adv, y_adv = self._resume(x_orig, y_orig, bs, path)
            else:
                x_adv, y_adv = super().run_standard_evaluation(x_orig, y_orig, batch_size=bs, state_path=path)
        return (x_adv, y_adv) if return_labels else x_adv

    def _resume(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int,
                path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        state = with_sets(_py_state.EvaluationState.from_disk(path))
        if set(self.attacks_to_run) != state.attacks_to_run:
            raise ValueError(f"AutoAttack state {path} was created with a different set of attacks to run")
        all_attacks, x_adv = list(self.attacks_to_run), x_orig.clone()
        robust = state.robust_flags.to(x_orig.device)
        try:
            for name in [a for a in all_attacks if a not in state.run_attacks]:
                index = robust.nonzero().squeeze(1)
                if index.numel():
                    self.attacks_to_run = [name]  # the library's way to run one attack of the version
                    x_new, y_new = super().run_standard_evaluation(x_orig[index], y_orig[index], batch_size=bs)
                    fooled = y_new != y_orig[index]
                    robust[index[fooled]] = False
                    x_adv[index[fooled]] = x_new[fooled]
                state.robust_flags = robust.cpu()  # the setter writes the file
                state.add_run_attack(name)
        finally:
            self.attacks_to_run = all_attacks
        state.to_disk(force=True)
        with torch.no_grad():
            y_adv = torch.cat([self.get_logits(chunk).argmax(dim=1) for chunk in x_adv.split(bs)])
        return x_adv, y_adv

    def run_standard_evaluation_individual(self, x_orig: torch.Tensor, y_orig: torch.Tensor, bs: int = 250,
                                           return_labels: bool = False) -> dict:
        """Run each attack alone on all points; a dict from attack name to its result."""
        all_attacks, results = list(self.attacks_to_run), {}
        try:
            for name in all_attacks:
                self.attacks_to_run = [name]
                results[name] = self.run_standard_evaluation(x_orig, y_orig, bs=bs, return_labels=return_labels)
        finally:
            self.attacks_to_run = all_attacks
        return results


def _has_progress(state_path: Path) -> bool:
    """Whether a pyautoattack state file holds robust flags; one written before them is removed."""
    if not state_path.exists():
        return False
    if json.loads(state_path.read_text()).get("_robust_flags") is None:
        state_path.unlink()  # the library cannot load it and it holds nothing to resume
        return False
    return True


def with_sets(state: object) -> object:
    """Undo pyautoattack 0.2.0's JSON round trip: the attack set comes back as its str(), the run set as a list."""
    if isinstance(state._attacks_to_run, str):
        state._attacks_to_run = set(ast.literal_eval(state._attacks_to_run))
    state._run_attacks = set(state._run_attacks)
    return state
