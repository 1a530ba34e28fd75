"""AutoAttack adapter: the git ``autoattack`` package when importable, else PyPI ``pyautoattack``.

The adapter runs the version's attacks one at a time on the points still robust, as AutoAttack
does, and after each attack saves the robust flags and the adversarial examples found so far to an
atomic state file, so an interrupted evaluation resumes where it stopped (pyautoattack's own state
file writes in place and cannot resume the examples). Evaluation runs in float32 with autocast off
(low precision can mask gradients), the caller's global RNG state is kept (the library reseeds it),
and every returned example is inside the eps ball and [0, 1] exactly; a sample counts as broken
only if the model misclassifies that exact example.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from core.threat import NORMS
from errors import UserError

from .context import attack_mode
from .geometry import clip_exact

AA_VERSIONS = ("standard", "plus", "rand", "custom")
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AA_NORMS = NORMS


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "Linf",
               version: str = "standard", attacks: Optional[Sequence[str]] = None, seed: int = 0,
               batch_size: int = 500, state_path: Optional[str | Path] = None,
               log_path: Optional[str | Path] = None, verbose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run AutoAttack; returns ``(x_adv, robust_flags)``: float32 examples and a bool per sample.

    ``version`` is ``standard`` / ``plus`` / ``rand`` or ``custom`` with ``attacks`` (a list of
    ``apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square``). With ``state_path`` the evaluation resumes
    from that file after an interruption (and refuses a file made for other settings, data or
    weights). ``log_path`` receives the library's log; ``verbose`` shows a progress bar and the log.
    """
    _check_args(x, y, eps, norm, version, attacks, batch_size)
    x, y = x.detach().float().contiguous(), y.detach()  # APGD .view()s tensors shaped like x
    with attack_mode(model), torch.autocast(x.device.type, enabled=False), _keep_rng(x.device):
        adversary = _make_adversary(model, eps=eps, norm=norm, version=version, attacks=attacks, seed=seed,
                                    device=x.device, log_path=log_path, verbose=verbose)
        names = list(adversary.attacks_to_run) if eps > 0 else []  # eps 0: clean accuracy
        fingerprint = _fingerprint(model, x, y, eps=eps, norm=norm, version=version, attacks=names, seed=seed)
        progress = _Progress.resume_or_start(state_path, fingerprint, model, x, y, batch_size)
        bar = tqdm(names, desc="AutoAttack", disable=not verbose, file=sys.stdout)
        for name in bar:
            if name not in progress.finished:
                _run_one_attack(adversary, name, model, x, y, progress, eps=eps, norm=norm, batch_size=batch_size)
                progress.finished.append(name)
                progress.save(state_path)
            bar.set_postfix(attack=name, robust=f"{progress.robust_flags.float().mean().item():.2%}")
    return progress.adversarial(x), progress.robust_flags.to(x.device)


@dataclass
class _Progress:
    """Robust flags and the adversarial examples found so far (only fooled points differ from x)."""

    fingerprint: dict
    robust_flags: torch.Tensor  # bool, CPU
    adv_index: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    adv_images: Optional[torch.Tensor] = None
    finished: list[str] = field(default_factory=list)

    @classmethod
    def resume_or_start(cls, state_path: Optional[str | Path], fingerprint: dict, model: nn.Module,
                        x: torch.Tensor, y: torch.Tensor, batch_size: int) -> "_Progress":
        if state_path is not None and Path(state_path).is_file():
            return cls.load(Path(state_path), fingerprint)
        robust = (_predict(model, x, batch_size) == y).cpu()
        progress = cls(fingerprint, robust, adv_images=x.new_zeros((0, *x.shape[1:])).cpu())
        progress.save(state_path)
        return progress

    @classmethod
    def load(cls, path: Path, fingerprint: dict) -> "_Progress":
        from core.torch_files import load_checkpoint

        state = load_checkpoint(path)
        if state.get("fingerprint") != fingerprint:
            raise UserError(f"AutoAttack state file {path} was made for other settings, data or weights; "
                            "delete it or pass another state path")
        return cls(state["fingerprint"], state["robust_flags"], state["adv_index"], state["adv_images"],
                   list(state["finished"]))

    def save(self, state_path: Optional[str | Path]) -> None:
        if state_path is None:
            return
        from core.torch_files import save_checkpoint

        save_checkpoint({"fingerprint": self.fingerprint, "robust_flags": self.robust_flags,
                         "adv_index": self.adv_index, "adv_images": self.adv_images,
                         "finished": list(self.finished)}, state_path)

    def record(self, index: torch.Tensor, images: torch.Tensor) -> None:
        """Mark ``index`` as broken by ``images`` (exactly inside the ball, misclassified)."""
        self.robust_flags[index.cpu()] = False
        self.adv_index = torch.cat([self.adv_index, index.cpu()])
        self.adv_images = torch.cat([self.adv_images, images.detach().cpu()])

    def adversarial(self, x: torch.Tensor) -> torch.Tensor:
        x_adv = x.clone()
        x_adv[self.adv_index.to(x.device)] = self.adv_images.to(x.device)
        return x_adv


def _run_one_attack(adversary: object, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    progress: _Progress, *, eps: float, norm: str, batch_size: int) -> None:
    index = progress.robust_flags.nonzero().squeeze(1).to(x.device)
    if index.numel() == 0:
        return
    # The library's API: replacing the list keeps the version's settings (restarts, targets, queries).
    adversary.attacks_to_run = [name]
    x_sub, y_sub = x[index], y[index]
    x_out, _ = adversary.run_standard_evaluation(x_sub, y_sub, bs=batch_size, return_labels=True)
    x_out = clip_exact(x_out.to(x.device).float(), x_sub, eps=eps, norm=norm)
    changed = (x_out != x_sub).flatten(1).any(dim=1).nonzero().squeeze(1)
    fooled = changed[_predict(model, x_out[changed], batch_size) != y_sub[changed]]
    progress.record(index[fooled], x_out[fooled])


def _make_adversary(model: nn.Module, *, eps: float, norm: str, version: str, attacks: Optional[Sequence[str]],
                    seed: int, device: torch.device, log_path: Optional[str | Path], verbose: bool) -> object:
    from . import rb_bridge

    AutoAttack = rb_bridge.autoattack_class()
    return AutoAttack(model, norm=norm, eps=eps, seed=seed, verbose=verbose, version=version,
                      attacks_to_run=list(attacks or []), device=device,
                      log_path=str(log_path) if log_path is not None else None)


@contextmanager
def _keep_rng(device: torch.device) -> Iterator[None]:
    """AutoAttack reseeds the global RNGs with its seed; give the caller's streams back afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    with torch.no_grad():
        return torch.cat([model(chunk).argmax(dim=1) for chunk in x.split(batch_size)])


def _fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **settings: object) -> dict:
    """Settings plus checksums of data and weights, so a state file is never resumed for another run."""
    with torch.no_grad():
        weights = sum(float(t.double().sum()) for t in model.state_dict().values() if t.is_floating_point())
        positions = torch.arange(1, len(y) + 1, device=y.device, dtype=torch.float64)
        return {**settings, "n": int(len(y)), "x_sum": float(x.double().sum()),
                "y_sum": float((y.double() * positions).sum()), "weights_sum": weights}


def _check_args(x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, version: str,
                attacks: Optional[Sequence[str]], batch_size: int) -> None:
    if norm not in AA_NORMS:
        raise UserError(f"unknown AutoAttack norm {norm!r}; use one of {', '.join(AA_NORMS)}")
    if version not in AA_VERSIONS:
        raise UserError(f"unknown AutoAttack version {version!r}; use one of {', '.join(AA_VERSIONS)}")
    if (version == "custom") != bool(attacks):
        raise UserError("AutoAttack takes an attack list exactly when version='custom'; "
                        f"got version={version!r}, attacks={attacks!r}")
    unknown = sorted(set(attacks or []) - set(AA_ATTACKS))
    if unknown:
        raise UserError(f"unknown AutoAttack attacks {unknown}; choose from {', '.join(AA_ATTACKS)}")
    if not eps >= 0 or batch_size < 1:
        raise UserError(f"AutoAttack needs eps >= 0 and batch_size >= 1 (got eps={eps}, batch_size={batch_size})")
    if x.shape[0] != y.shape[0]:
        raise UserError(f"AutoAttack got {x.shape[0]} images but {y.shape[0]} labels; pass matching tensors")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise UserError("AutoAttack inputs must lie in [0, 1]; move normalisation into the model")
