"""The evaluation suite from Python: any ``nn.Module`` on tensors, for people who bring their own loop.

    from evaluation.api import evaluate
    ev = evaluate(model, x_test, y_test, eps=["4/255", "8/255"], attacks=["pgd20", "cw20", "aa"],
                  out="eval/mine", resume=True)
    print(ev.summary())          # clean and worst-case robust accuracy per eps
    ev.table()                   # pandas: one row per eps, Clean / each attack / Worst in %

It is the suite ``eval_autoattack.py`` runs (:func:`evaluation.suite.run_suite`): every attack at
every eps with the survivors carried up the radii, fixed chunks of points as the unit of seeding
and resume, the sanity checks. With ``out`` every finished (eps, attack, chunk) is kept in
``out/cache`` (``resume=True`` reuses what matches this model, these points and these settings)
and the reports (report.json, per_sample.csv, tables, the plot) are written there. Under torchrun
(or an initialised process group) every process calls :func:`evaluate` with the same arguments,
attacks its share of the chunks, and gets the whole result, identical to one process's.
"""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd
import torch
import torch.nn as nn

from core.threat import STANDARD_EPS, check_norm, eps_text, parse_eps
from errors import UserError

from . import sharding
from .inputs import points_identity
from .report import environment_info, per_sample_frame, table_attacks, write_reports
from .results import SuiteResult, SuiteSettings
from .runners import model_device
from .store import ResultStore, check_resume
from .suite import run_suite, summary_line

Radius = Union[float, str]


@dataclass
class Evaluation:
    """What :func:`evaluate` found: the flags of every point (``result``) and the report files written."""

    result: SuiteResult
    paths: dict[str, Path] = field(default_factory=dict)

    def accuracy(self, eps: float, attack: str = "worst") -> float:
        """Accuracy in [0, 1] under ``attack`` (an attack's name, ``clean`` or ``worst``) at ``eps``."""
        return self.result.accuracy(eps, attack)

    def robust(self, eps: float, attack: str = "worst") -> torch.Tensor:
        """Per-point flags: True where the point is classified correctly and ``attack`` found no example."""
        return self.result.robust(eps, attack)

    def table(self) -> pd.DataFrame:
        """One row per eps; Clean, each attack and Worst in percent."""
        return table_attacks(self.result)

    def per_sample(self) -> pd.DataFrame:
        """One row per point: label, clean and ``attack@eps`` flags (0/1), as ``per_sample.csv``."""
        return per_sample_frame(self.result)

    def summary(self) -> str:
        return summary_line(self.result)

    @property
    def warnings(self) -> list[str]:
        return list(self.result.warnings)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: Optional[Sequence[Radius]] = None,
             attacks: Sequence[str] = ("aa",), norm: str = "Linf", out: Optional[str | os.PathLike] = None,
             resume: bool = False, seed: int = 0, batch_size: int = 256,
             chunk_size: int = sharding.DEFAULT_CHUNK_SIZE, save_adv: bool = False, progress: bool = True,
             name: Optional[str] = None) -> Evaluation:
    """Evaluate ``model`` on images ``x`` (N x C x H x W in [0, 1], on any device) with labels ``y``.

    ``eps``: radii, numbers in pixel units (``8 / 255``) or texts in the norm's notation
    (``"8/255"``, ``"0.5"``); default, as on the command line, RobustBench's 8/255 (L-inf), 0.5 (L2)
    or 12 (L1). ``attacks``: names as on the command line (``clean``,
    ``pgd20``, ``cw20``, ``aa``, ``aa-plus``, ``aa:apgd-ce,apgd-t``). ``out``: folder for the
    reports and the resume cache (None: nothing is written). ``name`` labels the model in the
    reports. Mistakes are ``errors.UserError`` with a one-line message.
    """
    x, y = _check_points(x, y)
    settings = SuiteSettings.build(_radii(eps, norm, x), list(attacks), norm=norm, seed=seed,
                                   batch_size=batch_size, chunk_size=chunk_size)
    _check_model(model, x, y)
    shard, started = _shard(model_device(model), len(y), chunk_size)
    try:
        return _run(model, x, y, settings, Path(out) if out is not None else None, resume, save_adv, progress,
                    shard, name)
    finally:
        if started:
            sharding.stop()


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: SuiteSettings, out: Optional[Path],
         resume: bool, save_adv: bool, progress: bool, shard: sharding.Shard, name: Optional[str]) -> Evaluation:
    start = time.perf_counter()
    if out is None:
        return Evaluation(run_suite(model, x, y, settings, progress=progress, shard=shard))
    radii = manifest_radii(settings)
    if resume:
        check_resume(out / "cache", radii, settings.chunk_size)
    model_info = {"kind": "python", "class": f"{type(model).__module__}.{type(model).__qualname__}",
                  "name": name or type(model).__name__, "weights_sha256": weights_digest(model)}
    data = {"dataset": "tensors", "split": None, "n": len(y), "description": f"{len(y)} points given as tensors",
            "points": points_identity(x, y)}
    with _out_lock(out) if shard.is_main else nullcontext():
        store = ResultStore(out / "cache", {"model": model_info, "data": data}, resume=resume)
        if shard.is_main:
            store.write_manifest(radii, settings.chunk_size)
        result = run_suite(model, x, y, settings, store=store, progress=progress, shard=shard,
                           adv_dir=out / "adv" if save_adv else None)
        paths: dict[str, Path] = {}
        if shard.is_main:
            meta = {"model": model_info, "data": data,
                    "environment": {**environment_info(model_device(model)), "processes": shard.world_size},
                    "command": "evaluation.api.evaluate", "out": str(out),
                    "wall_seconds": round(time.perf_counter() - start, 2)}
            paths = write_reports(result, out, meta)
    return Evaluation(result, paths)


def manifest_radii(settings: SuiteSettings) -> list[Radius]:
    """The radii a resume must match (``evaluation.store.check_resume``): floats for L-inf, else ``NORM:radius``."""
    if settings.norm == "Linf":
        return list(settings.eps)
    return [f"{settings.norm}:{eps_text(e, settings.norm)}" for e in settings.eps]


def weights_digest(model: nn.Module) -> str:
    """sha256 of every tensor of ``model.state_dict()`` (names, dtypes, shapes, bytes): the model's identity."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_points(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UserError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim != 4 or not x.is_floating_point():
        raise UserError(f"x must be float images N x C x H x W in [0, 1], got {x.dtype} of shape {tuple(x.shape)}")
    if y.ndim != 1 or len(y) != len(x) or y.is_floating_point():
        raise UserError(f"y must hold one integer label per image: {len(x)} images, y is {y.dtype} of shape "
                        f"{tuple(y.shape)}")
    if len(y) == 0:
        raise UserError("no points to evaluate: x and y are empty")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        raise UserError(f"x holds values in [{low:.3g}, {high:.3g}]: the suite attacks images in [0, 1] (divide "
                        "uint8 images by 255; put any normalisation inside the model)")
    return x, y.long()


def _radii(eps: Optional[Sequence[Radius]], norm: str, x: torch.Tensor) -> list[float]:
    check_norm(norm, "norm")
    if eps is None:  # the command line's default: RobustBench's radius of the norm
        return [STANDARD_EPS[norm]]
    values = [eps] if isinstance(eps, (int, float, str)) else list(eps)
    return [parse_eps(str(v), norm, dim=int(x[0].numel())) for v in values]


def _check_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Logits N x K with K above every label, on two of the points: else one line, before any attack runs."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x[:2].to(model_device(model)))
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward
        shape = "x".join(str(d) for d in x.shape[1:])
        raise UserError(f"the model fails on images of {shape}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        model.train(was_training)
    needed = int(y.max()) + 1
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < needed:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"the model returns {got} for 2 images, but the labels go up to {needed - 1}: it must "
                        f"return logits N x K with K >= {needed}")


def _shard(device: torch.device, n: int, chunk_size: int) -> tuple[sharding.Shard, bool]:
    """This process's shard: of an initialised group, of torchrun's environment (joined here), or alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        shard = sharding.Shard.current()
        sharding.check_world_size(n, chunk_size, shard.world_size)
        return shard, False
    world = sharding.env_world_size()
    sharding.check_world_size(n, chunk_size, world)
    return sharding.start(device), world > 1


def _out_lock(out: Path):
    from core.files import folder_lock

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}; pick another out") from None
    return folder_lock(out, lambda pid: f"{out} is in use by another evaluation (process {pid or '?'} holds "
                                        f"{out / '.lock'}): wait for it to end, or choose another out")
