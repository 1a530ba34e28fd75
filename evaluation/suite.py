"""The multi-epsilon evaluation suite: clean, PGD, CW and AutoAttack over ascending radii.

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

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from training.config import eps_str

from .spec import PGD_STEP_FRACTION, AttackSpec, parse_attacks
from .store import ResultStore, attack_tag, eps_tag, stable_hash

NORMS = ("Linf", "L2")
_BOUND_TOL = 1e-5  # float slack when checking ||x_adv - x|| <= eps


def attack_seed(seed: int, eps: float, attack: str) -> int:
    """Seed of the generator used for ``attack`` at ``eps``: a stable hash of the three (< 2**31)."""
    return int(stable_hash([int(seed), eps_str(eps), attack])[:8], 16) & 0x7FFFFFFF


@dataclass(frozen=True)
class SuiteSettings:
    """Everything that decides the suite's numbers besides the model and the data."""

    eps: tuple[float, ...]
    attacks: tuple[AttackSpec, ...]
    norm: str = "Linf"
    seed: int = 0
    batch_size: int = 256
    step_fraction: float = PGD_STEP_FRACTION

    @classmethod
    def build(cls, eps: Sequence[float], attacks: Sequence[str], **kw: Any) -> "SuiteSettings":
        """Sort and de-duplicate ``eps``, parse ``attacks`` (``clean`` implied) and validate."""
        from errors import UserError

        unique: dict[float, float] = {}
        for e in eps:
            unique.setdefault(round(float(e), 9), float(e))
        radii = tuple(sorted(unique.values()))
        if not radii:
            raise UserError("no epsilon given: pass --eps, e.g. --eps 8/255")
        settings = cls(eps=radii, attacks=tuple(parse_attacks(list(attacks))), **kw)
        if settings.norm not in NORMS:
            raise UserError(f"--norm {settings.norm!r} is not one of: {', '.join(NORMS)}")
        if settings.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {settings.batch_size}")
        return settings

    def step(self, eps: float) -> float:
        """PGD/CW step size at ``eps`` (eps/4: 2/255 at 8/255, as in the paper's Table 15)."""
        return eps * self.step_fraction

    def as_dict(self) -> dict[str, Any]:
        return {"eps": list(self.eps), "eps_str": [eps_str(e) for e in self.eps],
                "attacks": [a.name for a in self.attacks], "norm": self.norm, "seed": self.seed,
                "batch_size": self.batch_size, "step_fraction": self.step_fraction,
                "pgd_rule": "PGD/CW: step = eps * step_fraction, uniform random start, 1 restart, "
                            "CW = PGD on the CW margin loss"}


@dataclass
class AttackResult:
    """Robust flags of one attack at one eps over all evaluated points."""

    attack: str
    eps: float
    robust: torch.Tensor
    attacked: int
    seconds: float
    seed: int
    cached: bool = False

    @property
    def accuracy(self) -> float:
        return self.robust.float().mean().item() if self.robust.numel() else float("nan")


@dataclass
class SuiteResult:
    """All flags of one suite run plus the warnings raised while running and by the checks."""

    settings: SuiteSettings
    labels: torch.Tensor
    clean: torch.Tensor
    results: dict[tuple[float, str], AttackResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.labels.numel())

    @property
    def attack_names(self) -> list[str]:
        return [a.name for a in self.settings.attacks if a.kind != "clean"]

    def _eps(self, eps: float) -> float:
        """The run's own eps value equal to ``eps`` up to float noise (8/255 typed two ways)."""
        for own in self.settings.eps:
            if math.isclose(own, eps, rel_tol=0, abs_tol=1e-9):
                return own
        raise KeyError(f"eps {eps_str(eps)} was not evaluated; evaluated: "
                       f"{', '.join(eps_str(e) for e in self.settings.eps)}")

    def robust(self, eps: float, attack: str) -> torch.Tensor:
        """Per-sample robust flags; ``attack="worst"`` is robust only if every attack failed."""
        eps = self._eps(eps)
        if attack == "clean":
            return self.clean
        if attack == "worst":
            flags = self.clean.clone()
            for name in self.attack_names:
                flags &= self.results[(eps, name)].robust
            return flags
        return self.results[(eps, attack)].robust

    def accuracy(self, eps: float, attack: str) -> float:
        """Robust accuracy in [0, 1] of ``attack`` (or clean / worst) at ``eps``."""
        return self.robust(eps, attack).float().mean().item() if self.n else float("nan")


@contextmanager
def fp32_eval(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, parameter grads off (``attacks.attack_mode``) and autocast disabled."""
    from attacks import attack_mode

    autocast = torch.autocast(device_type=device.type, enabled=False) if device.type in ("cuda", "cpu") \
        else nullcontext()
    with attack_mode(model), autocast:
        yield


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max predictions of ``model`` on ``x`` (on x's device), in batches."""
    device = model_device(model)
    out = [model(x[i:i + batch_size].to(device)).argmax(1).to(x.device) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def perturbation_norm(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample L-inf or L2 size of ``x_adv - x``."""
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


class _Runner:
    """Runs the (eps, attack) grid for one model and data set; holds the shared state."""

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
        carried = {a.name: clean.clone() for a in s.attacks if a.kind != "clean"}
        chain: list[float] = []
        for eps in s.eps:
            chain.append(eps)
            for spec in s.attacks:
                if spec.kind == "clean":
                    continue
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
            self.say(f"{eps_str(eps)} {spec.name}: {res.accuracy:.2%} (resumed)")
            return res
        start, n_warn = time.perf_counter(), len(self.warnings)
        idx = candidates.nonzero().flatten().cpu()
        if spec.kind in ("pgd", "cw"):
            broken, x_adv = self.iterative(spec, eps, idx, seed)
        else:
            state = self.store.aa_state_path(spec.name, eps, key) if self.store is not None else None
            broken, x_adv = self.autoattack(spec, eps, idx, seed, state)
        robust = candidates.clone().cpu()
        robust[idx[broken]] = False
        res = AttackResult(spec.name, eps, robust, len(idx), time.perf_counter() - start, seed)
        if self.adv_dir is not None:
            self.save_adv(spec, eps, idx[broken], x_adv[broken])
        if self.store is not None:
            self.store.save(spec.name, eps, key, robust, attacked=len(idx), seconds=res.seconds, seed=seed,
                            warnings=self.warnings[n_warn:])
        self.say(f"{eps_str(eps)} {spec.name}: {res.accuracy:.2%} ({int(robust.sum())}/{len(robust)}), "
                 f"attacked {len(idx)}, {res.seconds:.1f} s")
        return res

    def iterative(self, spec: AttackSpec, eps: float, idx: torch.Tensor,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """PGD or CW on the points ``idx`` in batches. Each point's random start comes from ``seed`` and
        its index alone, so a point is attacked exactly as in a run over any other subset (the
        separate one-eps runs a multi-eps run replaces)."""
        from attacks import cw, indexed_random_start, pgd

        s, fn = self.settings, (pgd if spec.kind == "pgd" else cw)
        broken, advs = [], []
        bar = tqdm(total=len(idx), desc=f"{spec.name} {eps_str(eps)}", unit="img", leave=False,
                   disable=not self.progress)
        with bar:
            for i in range(0, len(idx), s.batch_size):
                part = idx[i:i + s.batch_size]
                xb, yb = self.x[part].to(self.device), self.y[part].to(self.device)
                start = indexed_random_start(xb, part, eps, s.norm, seed)
                x_adv = fn(self.model, xb, yb, eps=eps, step=s.step(eps), steps=spec.steps, norm=s.norm,
                           start=start).detach()
                pred = predict(self.model, x_adv, s.batch_size)
                self.check_bound(spec, eps, x_adv, xb)
                broken.append((pred != yb).cpu())
                advs.append(x_adv.cpu())
                bar.update(len(part))
        return self._cat(broken, advs)

    def autoattack(self, spec: AttackSpec, eps: float, idx: torch.Tensor, seed: int,
                   state_path: Optional[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """AutoAttack (standard / plus / rand / custom list) on the points ``idx``."""
        from attacks import autoattack

        s = self.settings
        if len(idx) == 0:
            return torch.zeros(0, dtype=torch.bool), self.x[:0].cpu()
        xs, ys = self.x[idx].to(self.device), self.y[idx].to(self.device)
        bar = tqdm(total=len(idx), desc=f"{spec.name} {eps_str(eps)}", unit="img", leave=False,
                   disable=not self.progress)
        with bar, _capture_autoattack_warnings() as messages:
            x_adv, robust = autoattack(self.model, xs, ys, eps=eps, norm=s.norm, version=spec.version,
                                       attacks=list(spec.components) or None, seed=seed,
                                       batch_size=s.batch_size, state_path=state_path, verbose=False)
            bar.update(len(idx))
        for message in messages:
            self.warn(f"AutoAttack ({spec.name} at {eps_str(eps)}): {message}")
        broken = ~robust.bool().cpu()
        x_adv = x_adv.detach().cpu()
        self.check_bound(spec, eps, x_adv[broken], xs[broken].cpu())
        return broken, x_adv

    def check_bound(self, spec: AttackSpec, eps: float, x_adv: torch.Tensor, x: torch.Tensor) -> None:
        """Warn when an attack left the eps-ball or the [0, 1] box (a bug in the attack)."""
        if x_adv.numel() == 0:
            return
        size = perturbation_norm(x_adv, x, self.settings.norm).max().item()
        if size > eps + _BOUND_TOL or x_adv.min().item() < -_BOUND_TOL or x_adv.max().item() > 1 + _BOUND_TOL:
            self.warn(f"{spec.name} at {eps_str(eps)} returned points outside the {self.settings.norm} ball "
                      f"or [0, 1] (largest perturbation {size * 255:.3g}/255): its numbers are invalid")

    def _adv_path(self, spec: AttackSpec, eps: float) -> Path:
        assert self.adv_dir is not None
        return self.adv_dir / f"{attack_tag(spec.name)}_{eps_tag(eps)}.pt"

    def save_adv(self, spec: AttackSpec, eps: float, idx: torch.Tensor, x_adv: torch.Tensor) -> None:
        """Save the adversarial examples found at this eps (indices into the evaluated points).

        Points broken at a smaller eps are not repeated here: their examples are in that eps's file.
        """
        from checkpoints.io import save_checkpoint

        found = perturbation_norm(x_adv, self.x[idx].cpu(), self.settings.norm) > 0
        save_checkpoint({"attack": spec.name, "eps": eps, "norm": self.settings.norm,
                         "indices": idx[found].clone(), "x_adv": x_adv[found].clone(),
                         "labels": self.y[idx[found]].cpu().clone()}, self._adv_path(spec, eps))

    def _cat(self, broken: list[torch.Tensor], advs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if not broken:
            return torch.zeros(0, dtype=torch.bool), self.x[:0].cpu()
        return torch.cat(broken), torch.cat(advs)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip())


@contextmanager
def _capture_autoattack_warnings() -> Iterator[list[str]]:
    """Collect AutoAttack's own checks (randomness, Square vs white-box, ...) logged as warnings."""
    logger = logging.getLogger("auto-attack")
    handler = _ListHandler()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def run_suite(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: SuiteSettings, *,
              store: Optional[ResultStore] = None, adv_dir: Optional[str | Path] = None,
              progress: bool = True) -> SuiteResult:
    """Evaluate ``model`` on ``(x, y)`` (images in [0, 1]) with every attack at every eps.

    ``store`` caches finished (eps, attack) results and AutoAttack state (resumable runs);
    ``adv_dir`` saves the adversarial examples. The sanity checks' warnings are in the result.
    """
    from .checks import sanity_checks

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
        worst = " ".join(f"{eps_str(e)} {result.accuracy(e, 'worst'):.2%}" for e in result.settings.eps)
        parts.append(f"worst over {'+'.join(result.attack_names)}: {worst}")
    parts.append(f"{len(result.warnings)} warning(s)")
    return " | ".join(parts)
