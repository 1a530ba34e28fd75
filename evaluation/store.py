"""On-disk cache of finished (eps, attack, chunk) results, so an interrupted evaluation resumes.

Each finished result is one small file written atomically. Its key hashes everything that decides
the result: the model and data identity, the suite settings, the attack, the chain of smaller
epsilons whose survivors it attacked and the chunk of points (never the process that ran it, so a
resume on another number of processes reuses it). A file whose key does not match is never
reused. ``suite.json`` (the manifest) records the eps list and chunk size of the run the folder
belongs to; a resume that changes either is refused (:func:`check_resume`), except that a resume
may add or leave out a whole norm (each norm is a suite of its own, with its own keys).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from core.files import atomic_write_text
from core.threat import eps_str
from core.torch_files import CheckpointUnreadable, UnsafeCheckpoint, load_checkpoint, save_checkpoint
from errors import UserError

MANIFEST = "suite.json"


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

    def key(self, attack: str, eps_chain: list[float], settings: dict[str, Any],
            chunk: Optional[dict[str, int]] = None) -> str:
        """Key of the result of ``attack`` at ``eps_chain[-1]`` after carrying ``eps_chain[:-1]``,
        on the points of ``chunk`` (``{"index", "start", "stop"}``; None: all points)."""
        payload = {"identity": self.identity, "settings": settings, "attack": attack,
                   "eps_chain": [round(e, 10) for e in eps_chain]}
        if chunk is not None:
            payload["chunk"] = dict(chunk)
        return stable_hash(payload)

    def _path(self, attack: str, eps: float, key: str, suffix: str, chunk: Optional[int]) -> Path:
        part = "" if chunk is None else f"_c{chunk:05d}"
        return self.folder / f"{attack_tag(attack)}_{eps_tag(eps)}{part}_{key[:12]}{suffix}"

    def result_path(self, attack: str, eps: float, key: str, chunk: Optional[int] = None) -> Path:
        return self._path(attack, eps, key, ".pt", chunk)

    def state_path(self, attack: str, eps: float, key: str, chunk: Optional[int] = None) -> Path:
        """Where an attack that can resume mid-way (AutoAttack) keeps its state for this (eps, attack, chunk)."""
        path = self._path(attack, eps, key, ".aa_state.pt", chunk)
        if path.exists() and (not self.resume or self._read(path) is None):
            path.unlink()  # a fresh run must not continue an older, possibly unfinished one; nor a damaged one
        return path

    def load(self, attack: str, eps: float, key: str, chunk: Optional[int] = None) -> Optional[dict[str, Any]]:
        """The saved result for ``key`` when resuming and present, else None (also for a damaged file, which
        is then computed again)."""
        path = self.result_path(attack, eps, key, chunk)
        if not self.resume or not path.is_file():
            return None
        state = self._read(path)
        return state if state is not None and state.get("key") == key else None

    @staticmethod
    def _read(path: Path) -> Optional[dict[str, Any]]:
        """A cached file's contents; None with a note when it is damaged (cut short, random bytes, foreign)."""
        try:
            state = load_checkpoint(path)
        except (CheckpointUnreadable, UnsafeCheckpoint) as e:
            print(f"note: {e}; its results are computed again", file=sys.stderr)
            return None
        if not isinstance(state, dict):
            print(f"note: {path} is not a cached result; its results are computed again", file=sys.stderr)
            return None
        return state

    def save(self, attack: str, eps: float, key: str, robust: torch.Tensor, chunk: Optional[int] = None,
             **extra: Any) -> Path:
        """Atomically write one finished result (``robust``: bool flags over the chunk's points)."""
        state = {"key": key, "attack": attack, "eps": float(eps), "robust": robust.detach().cpu(), **extra}
        return save_checkpoint(state, self.result_path(attack, eps, key, chunk))

    def write_manifest(self, eps: Sequence[Union[float, str]], chunk_size: int) -> Path:
        """Record the radii and chunk size this folder's results belong to (one process writes it); radii
        are floats (L-inf) or ``NORM:radius`` texts."""
        return atomic_write_text(self.folder / MANIFEST, json.dumps(_manifest(eps, chunk_size), indent=1))


def _manifest(eps: Sequence[Union[float, str]], chunk_size: int) -> dict[str, Any]:
    return {"eps": [e if isinstance(e, str) else eps_str(e) for e in eps], "chunk_size": int(chunk_size)}


def check_resume(folder: str | os.PathLike, eps: Sequence[Union[float, str]], chunk_size: int) -> None:
    """Refuse (``UserError``) a resume whose chunk size differs from the saved run's, or whose radii differ
    for a norm both evaluate (a norm may be added or left out: its suite is independent of the others).

    Reads only: call it before anything is written. A folder without a manifest has nothing to check.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
        saved_eps, saved_chunk = [str(e) for e in saved["eps"]], int(saved["chunk_size"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"cannot read the saved evaluation state {path}: delete it or rerun without --resume") from None
    wanted = _manifest(eps, chunk_size)
    if saved_chunk != wanted["chunk_size"]:
        raise UserError(f"--resume with --chunk-size {chunk_size}, but the saved state in {path.parent} was made "
                        f"with --chunk-size {saved_chunk}: pass --chunk-size {saved_chunk} (or drop --resume)")
    saved_by_norm, wanted_by_norm = _radii_by_norm(saved_eps), _radii_by_norm(wanted["eps"])
    # A norm added to (or left out of) the saved run is its own suite; each norm both have keeps its radii.
    if any(saved_by_norm[n] != wanted_by_norm[n] for n in saved_by_norm.keys() & wanted_by_norm.keys()):
        raise UserError(f"--resume with --eps {' '.join(wanted['eps'])}, but the saved state in {path.parent} was "
                        f"made for --eps {' '.join(saved_eps)}: pass the same --eps (or drop --resume, or use "
                        "another --out)")


def _radii_by_norm(eps: Sequence[str]) -> dict[str, list[str]]:
    """Manifest radii per norm: ``NORM:radius`` texts, a bare radius being L-inf (the one-norm L-inf form)."""
    by_norm: dict[str, list[str]] = {}
    for text in eps:
        norm, sep, radius = text.partition(":")
        if not sep:
            norm, radius = "Linf", text
        by_norm.setdefault(norm, []).append(radius)
    return by_norm
