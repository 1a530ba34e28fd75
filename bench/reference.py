"""Baselines outside the project's attack code: a textbook PGD loop, and torchattacks in a folder of its own.

``reference_pgd`` is L-inf PGD as Madry et al. describe it and as torchattacks' ``PGD`` runs it (a
uniform random start in the eps box, sign-gradient steps of the loss, projection onto the box and
[0, 1] after each step), written here without any of ``attacks/``'s code, so a comparison with it
grades nothing against itself. ``torchattacks_module`` installs torchattacks into a throwaway folder
and imports it from there: the project's environment never holds it (its wheel ships a copy of an old
``robustbench/`` that overwrites robustbench's own files, and pins ``requests``).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
import types
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

TORCHATTACKS = "torchattacks==3.5.1"


def reference_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
                  loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Untargeted L-inf PGD maximising ``loss`` (mean cross-entropy by default) from a uniform random start."""
    noise = torch.rand(x.shape, generator=generator, device=x.device if generator is None else generator.device)
    x_adv = (x + (noise.to(x.device) * 2 - 1) * eps).clamp(0, 1).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1).detach()
    return x_adv


def torchattacks_module(folder: str | Path, requirement: str = TORCHATTACKS) -> types.ModuleType:
    """``torchattacks`` installed with pip into ``folder`` (no dependencies: torch is already here) and
    imported from there alone; the copy of ``robustbench/`` its wheel carries is never importable."""
    folder = Path(folder)
    if importlib.machinery.PathFinder.find_spec("torchattacks", [str(folder)]) is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(folder),
                        requirement], check=True)
    spec = importlib.machinery.PathFinder.find_spec("torchattacks", [str(folder)])
    if spec is None:
        raise RuntimeError(f"pip installed {requirement} into {folder}, but it holds no torchattacks package")
    module = importlib.util.module_from_spec(spec)
    sys.modules["torchattacks"] = module  # its own absolute imports find the package here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("torchattacks", None)
        raise
    return module
