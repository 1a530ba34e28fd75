"""What an evaluation suite run is told (:class:`SuiteSettings`) and what it finds (flags per point)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from core.threat import NORMS, eps_str, eps_text

from .sharding import DEFAULT_CHUNK_SIZE
from .spec import PGD_STEP_FRACTION, AttackSpec, parse_attacks
from .store import stable_hash


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
    chunk_size: int = DEFAULT_CHUNK_SIZE  # points per chunk (evaluation.sharding): decides AutoAttack's batches

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
        if settings.chunk_size < 1:
            raise UserError(f"--chunk-size must be >= 1, got {settings.chunk_size}")
        return settings

    def step(self, eps: float) -> float:
        """PGD/CW step size at ``eps`` (eps/4: 2/255 at 8/255, as in the paper's Table 15)."""
        return eps * self.step_fraction

    def as_dict(self) -> dict[str, Any]:
        # "pgd_rule" is part of every cached result's key (key_dict) and stays verbatim, so evaluations
        # written before resume from their cache; the reports state the rules from the attack table.
        return {"eps": list(self.eps), "eps_str": [eps_text(e, self.norm) for e in self.eps],
                "attacks": [a.name for a in self.attacks], "norm": self.norm, "seed": self.seed,
                "batch_size": self.batch_size, "step_fraction": self.step_fraction, "chunk_size": self.chunk_size,
                "pgd_rule": "PGD/CW: step = eps * step_fraction, uniform random start, 1 restart, "
                            "CW = PGD on the CW margin loss"}

    def key_dict(self) -> dict[str, Any]:
        """The settings that decide one attack's flags (for the resume cache): not the other attacks or
        radii, since flags are carried per attack and the cache key holds the chain of smaller radii."""
        return {k: v for k, v in self.as_dict().items() if k not in ("eps", "eps_str", "attacks")}


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
        return [a.name for a in self.settings.attacks if a.family != "clean"]

    def _eps(self, eps: float) -> float:
        """The run's own eps value equal to ``eps`` up to float noise (8/255 typed two ways)."""
        for own in self.settings.eps:
            if math.isclose(own, eps, rel_tol=0, abs_tol=1e-9):
                return own
        norm = self.settings.norm
        raise KeyError(f"eps {eps_text(eps, norm)} was not evaluated; evaluated: "
                       f"{', '.join(eps_text(e, norm) for e in self.settings.eps)}")

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
