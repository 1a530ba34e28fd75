"""On-disk cache of finished (eps, attack) results, so an interrupted evaluation resumes.

Each finished result is one small file written atomically. Its key hashes everything that decides
the result: the model and data identity, the suite settings, the attack, and the chain of smaller
epsilons whose survivors it attacked. A file whose key does not match is never reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from core.torch_files import load_checkpoint, save_checkpoint
from errors import UserError


def eps_tag(eps: float) -> str:
    """File-name form of a radius: ``8over255`` (``2.5over255`` for fractional values)."""
    return f"{eps * 255:.6g}over255".replace(".", "p")


def attack_tag(name: str) -> str:
    """File-name form of an attack name (``aa:apgd-ce,apgd-t`` -> ``aa_apgd-ce_apgd-t``)."""
    return re.sub(r"[^a-z0-9-]+", "_", name.lower()).strip("_")


def stable_hash(payload: Any) -> str:
    """sha256 of the JSON form of ``payload`` (keys sorted), as hex."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class ResultStore:
    """Folder of finished per-(eps, attack) results plus AutoAttack state files.

    ``identity`` describes the model and the data (anything that changes results besides the
    suite's own settings). With ``resume=False`` nothing is read back and stale state is replaced.
    """

    def __init__(self, folder: str | os.PathLike, identity: dict[str, Any], resume: bool = False) -> None:
        self.folder = Path(folder)
        self.identity = identity
        self.resume = resume
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output folder {self.folder}: {e.strerror}; pick another --out") from None

    def key(self, attack: str, eps_chain: list[float], settings: dict[str, Any]) -> str:
        """Key of the result of ``attack`` at ``eps_chain[-1]`` after carrying ``eps_chain[:-1]``."""
        return stable_hash({"identity": self.identity, "settings": settings, "attack": attack,
                            "eps_chain": [round(e, 10) for e in eps_chain]})

    def _path(self, attack: str, eps: float, key: str, suffix: str) -> Path:
        return self.folder / f"{attack_tag(attack)}_{eps_tag(eps)}_{key[:12]}{suffix}"

    def result_path(self, attack: str, eps: float, key: str) -> Path:
        return self._path(attack, eps, key, ".pt")

    def state_path(self, attack: str, eps: float, key: str) -> Path:
        """Where an attack that can resume mid-way (AutoAttack) keeps its state for this (eps, attack)."""
        path = self._path(attack, eps, key, ".aa_state.pt")
        if not self.resume and path.exists():
            path.unlink()  # a fresh run must not continue an older, possibly unfinished one
        return path

    def load(self, attack: str, eps: float, key: str) -> Optional[dict[str, Any]]:
        """The saved result for ``key`` when resuming and present, else None."""
        path = self.result_path(attack, eps, key)
        if not self.resume or not path.is_file():
            return None
        state = load_checkpoint(path)
        return state if state.get("key") == key else None

    def save(self, attack: str, eps: float, key: str, robust: torch.Tensor, **extra: Any) -> Path:
        """Atomically write one finished result (``robust``: bool flags over all evaluated points)."""
        state = {"key": key, "attack": attack, "eps": float(eps), "robust": robust.detach().cpu(), **extra}
        return save_checkpoint(state, self.result_path(attack, eps, key))
