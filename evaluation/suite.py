"""The multi-epsilon evaluation suite: every attack of :data:`evaluation.spec.ATTACKS` over ascending radii.

Work is shared across radii: an adversarial example for a smaller eps is valid for a larger one,
so at each eps an attack only runs on the points it could not break at the previous eps (flags are
carried per attack), and a point broken at a smaller eps is never reported robust at a larger one.
PGD and CW draw each point's random start from (seed, eps, attack, point index), so every point
they attack gets the same start as in a separate one-eps run: their numbers equal separate runs
or are lower (breaks carried from smaller eps). AutoAttack's own randomness depends on the batch,
so its numbers equal separate runs up to that randomness.

Seeds per (eps, attack) come from the suite seed by :func:`attack_seed`; nothing here seeds the
global generators.
Attacks run in fp32 (autocast off) with the model in eval mode and parameter grads off.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from core.threat import eps_text

from .checks import sanity_checks
from .results import AttackResult, SuiteResult, SuiteSettings, attack_seed  # noqa: F401  (this module's API)
from .runners import model_device, perturbation_norm, predict
from .spec import AttackSpec
from .store import ResultStore, attack_tag, eps_tag

_BOUND_TOL = 1e-5  # float slack (relative above eps 1) when checking ||x_adv - x|| <= eps


@contextmanager
def fp32_eval(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, parameter grads off (``attacks.attack_mode``) and autocast disabled."""
    from attacks import attack_mode

    autocast = torch.autocast(device_type=device.type, enabled=False) if device.type in ("cuda", "cpu") \
        else nullcontext()
    with attack_mode(model), autocast:
        yield


class _Runner:
    """Runs the (eps, attack) grid for one model and data set; holds the shared state (a RunContext)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: SuiteSettings,
                 store: Optional[ResultStore], adv_dir: Optional[Path], progress: bool) -> None:
        self.model, self.x, self.y, self.settings = model, x, y, settings
        self.store, self.adv_dir, self.progress = store, adv_dir, progress
        self.device = model_device(model)
        self.warnings: list[str] = []

    def say(self, message: str) -> None:
        if self.progress:
            tqdm.write(message)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            self.say(f"warning: {message}")

    def run(self) -> SuiteResult:
        s = self.settings
        clean = predict(self.model, self.x, s.batch_size) == self.y
        result = SuiteResult(s, self.y.cpu(), clean.cpu())
        self.say(f"clean: {clean.float().mean().item():.2%} ({int(clean.sum())}/{len(clean)})")
        attacks = [a for a in s.attacks if a.entry.run is not None]
        carried = {a.name: clean.clone() for a in attacks}
        chain: list[float] = []
        for eps in s.eps:
            chain.append(eps)
            for spec in attacks:
                res = self.one(spec, eps, list(chain), carried[spec.name])
                carried[spec.name] = res.robust.to(clean.device)
                result.results[(eps, spec.name)] = res
        result.warnings = self.warnings
        return result

    def one(self, spec: AttackSpec, eps: float, chain: list[float], candidates: torch.Tensor) -> AttackResult:
        s = self.settings
        seed = attack_seed(s.seed, eps, spec.name)
        key = self.store.key(spec.name, chain, s.as_dict()) if self.store is not None else ""
        cached = self.store.load(spec.name, eps, key) if self.store is not None else None
        if cached is not None and (self.adv_dir is None or self._adv_path(spec, eps).is_file()):
            for message in cached.get("warnings", []):
                self.warn(message)
            res = AttackResult(spec.name, eps, cached["robust"].bool(), int(cached["attacked"]),
                               float(cached["seconds"]), seed, cached=True)
            self.say(f"{eps_text(eps, s.norm)} {spec.name}: {res.accuracy:.2%} (resumed)")
            return res
        start, n_warn = time.perf_counter(), len(self.warnings)
        idx = candidates.nonzero().flatten().cpu()
        state = self.store.state_path(spec.name, eps, key) if self.store is not None else None
        broken, x_adv = spec.entry.run(self, spec, eps, idx, seed, state)
        robust = candidates.clone().cpu()
        robust[idx[broken]] = False
        res = AttackResult(spec.name, eps, robust, len(idx), time.perf_counter() - start, seed)
        if self.adv_dir is not None:
            self.save_adv(spec, eps, idx[broken], x_adv[broken])
        if self.store is not None:
            self.store.save(spec.name, eps, key, robust, attacked=len(idx), seconds=res.seconds, seed=seed,
                            warnings=self.warnings[n_warn:])
        self.say(f"{eps_text(eps, s.norm)} {spec.name}: {res.accuracy:.2%} ({int(robust.sum())}/{len(robust)}), "
                 f"attacked {len(idx)}, {res.seconds:.1f} s")
        return res

    def check_bound(self, spec: AttackSpec, eps: float, x_adv: torch.Tensor, x: torch.Tensor) -> None:
        """Warn when an attack left the eps-ball or the [0, 1] box (a bug in the attack)."""
        if x_adv.numel() == 0:
            return
        norm = self.settings.norm
        size = perturbation_norm(x_adv, x, norm).max().item()
        if size > eps + _BOUND_TOL * max(1.0, eps) or x_adv.min().item() < -_BOUND_TOL or \
                x_adv.max().item() > 1 + _BOUND_TOL:
            self.warn(f"{spec.name} at {eps_text(eps, norm)} returned points outside the {norm} ball "
                      f"or [0, 1] (largest perturbation {eps_text(size, norm)}): its numbers are invalid")

    def _adv_path(self, spec: AttackSpec, eps: float) -> Path:
        assert self.adv_dir is not None
        return self.adv_dir / f"{attack_tag(spec.name)}_{eps_tag(eps)}.pt"

    def save_adv(self, spec: AttackSpec, eps: float, idx: torch.Tensor, x_adv: torch.Tensor) -> None:
        """Save the adversarial examples found at this eps (indices into the evaluated points).

        Points broken at a smaller eps are not repeated here: their examples are in that eps's file.
        """
        from core.torch_files import save_checkpoint

        found = perturbation_norm(x_adv, self.x[idx].cpu(), self.settings.norm) > 0
        save_checkpoint({"attack": spec.name, "eps": eps, "norm": self.settings.norm,
                         "indices": idx[found].clone(), "x_adv": x_adv[found].clone(),
                         "labels": self.y[idx[found]].cpu().clone()}, self._adv_path(spec, eps))


def run_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: SuiteSettings, *,
              store: Optional[ResultStore] = None, adv_dir: Optional[str | Path] = None,
              progress: bool = True) -> SuiteResult:
    """Evaluate ``model`` on ``(x, y)`` (images in [0, 1]) with every attack at every eps.

    ``store`` caches finished (eps, attack) results and AutoAttack state (resumable runs);
    ``adv_dir`` saves the adversarial examples. The sanity checks' warnings are in the result.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
    if adv_dir is not None:
        Path(adv_dir).mkdir(parents=True, exist_ok=True)
    runner = _Runner(model, x, y.to(x.device), settings, store, Path(adv_dir) if adv_dir else None, progress)
    with fp32_eval(model, runner.device):
        result = runner.run()
    for message in sanity_checks(result):
        runner.warn(message)
    result.warnings = runner.warnings
    return result


def summary_line(result: SuiteResult) -> str:
    """One line: clean accuracy, then per eps the worst case over the attacks run."""
    parts = [f"n={result.n}", f"clean {result.accuracy(result.settings.eps[0], 'clean'):.2%}"]
    if result.attack_names:
        norm = result.settings.norm
        worst = " ".join(f"{eps_text(e, norm)} {result.accuracy(e, 'worst'):.2%}" for e in result.settings.eps)
        parts.append(f"worst over {'+'.join(result.attack_names)}: {worst}")
    parts.append(f"{len(result.warnings)} warning(s)")
    return " | ".join(parts)
