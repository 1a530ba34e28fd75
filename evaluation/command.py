"""What eval_autoattack.py does with its config: load the model, attack its points, write the reports (:func:`main`).

Under torchrun every process attacks its share of the points' chunks and rank 0 writes the reports,
identical to a single process's (:mod:`evaluation.sharding`). Rank 0 holds ``OUT/.lock`` for the whole
evaluation, and writes reports only for the checkpoint file it loaded (unchanged since then).
"""
from __future__ import annotations

import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from checkpoints import run_folder
from checkpoints.run import load_model, load_robustbench_model, resolve_checkpoint
from core.device import resolve_device
from core.files import atomic_write_text
from core.threat import eps_text
from core.torch_files import write_failure
from data import NUM_CLASSES
from data.corruptions import CorruptedCifar
from errors import UserError
from models import check_output

from . import sharding
from .config import CONFIG_NAME, EvalConfig
from .corruptions import CorruptionSection, run_corruptions
from .inputs import load_eval_data, points_identity
from .report import environment_info, write_reports
from .sections import NormSection
from .store import ResultStore, check_resume
from .suite import run_suite, summary_line
from .tracking import track_report


def main(cfg: EvalConfig, *, argv: Sequence[str] = (), print_config: bool = False) -> int:
    """Validate, load, evaluate, write the reports; returns the exit code (``UserError`` is the caller's)."""
    cfg.validate()
    world = sharding.env_world_size()
    device = sharding.device_for(resolve_device(cfg.device), world)
    start = time.perf_counter()
    model, info, identity = load(cfg, device)
    cfg = cfg.resolved(info)
    if print_config:
        print(cfg.to_yaml(), end="")
        return 0
    suites, corruptions = cfg.suites(), cfg.corruption_settings()
    corrupted = CorruptedCifar.open(cfg.dataset, cfg.data_dir, corruptions.corruptions) if corruptions else None
    x, y, data = _points(cfg)
    check_output(model, tuple(x.shape[1:]), NUM_CLASSES[cfg.dataset], info.get("arch") or "the model")
    out = cfg.out_dir()
    idle = sharding.idle_note(len(y), cfg.chunk_size, world)
    if idle and sharding.env_rank() == 0:
        print(f"note: {idle}", file=sys.stderr)
    radii = _radii_list(suites)
    if cfg.resume:
        check_resume(out / "cache", radii, cfg.chunk_size)
    # One evaluation writes into --out: rank 0 holds the lock (torchrun stops the others if it cannot).
    with run_folder.output_lock(out, _busy(out)) if sharding.env_rank() == 0 else nullcontext():
        shard = sharding.start(device)
        try:
            store = ResultStore(out / "cache", _cache_identity(info, data), resume=cfg.resume)
            if shard.is_main:  # the settings first: a saved manifest always has them beside it for --resume
                atomic_write_text(out / CONFIG_NAME, cfg.to_yaml())
                store.write_manifest(radii, cfg.chunk_size)
                _echo(cfg, suites, info, data, out)
            results = [run_suite(model, x, y, s, store=store, progress=not cfg.quiet, shard=shard,
                                 adv_dir=(out / "adv" / ("" if i == 0 else s.norm)) if cfg.save_adv else None)
                       for i, s in enumerate(suites)]
            if not shard.is_main:
                return 0
            sections: list[Any] = [NormSection(r) for r in results[1:]]
            if corrupted is not None:  # not sharded: rank 0 runs it once the suites are gathered
                sections.append(CorruptionSection(run_corruptions(model, corrupted, corruptions, store=store,
                                                                  progress=not cfg.quiet)))
            if identity is not None:
                run_folder.check_unchanged(info["path"], identity, kept=f"the finished chunks stay in {out / 'cache'}")
            meta = {"model": dict(info), "data": data,
                    "environment": {**environment_info(device), "processes": shard.world_size},
                    "command": " ".join(["eval_autoattack.py"] + list(argv)), "out": str(out),
                    "wall_seconds": round(time.perf_counter() - start, 2)}
            paths = _write_reports(results[0], out, meta, sections)
            track_report(cfg.tracker, out, paths["json"])
        finally:
            sharding.stop()
    lines = [f"{r.settings.norm}: {summary_line(r)}" if len(results) > 1 else summary_line(r) for r in results]
    lines += [s.summary() for s in sections if isinstance(s, CorruptionSection)]
    short = cfg.n_ex is not None and cfg.n_ex > len(y)
    note = f" | --n-ex {cfg.n_ex} > the {len(y)} points of the split: all {len(y)} evaluated" if short else ""
    print(" || ".join(lines) + f"{note} | report: {paths['markdown']}")
    return 0


def load(cfg: EvalConfig, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any], run_folder.Identity]:
    """The model in eval mode, its info and the identity of the file it came from (None for a zoo model)."""
    if cfg.robustbench_model:
        board = cfg.norm[0] if cfg.norm and cfg.norm[0] in ("Linf", "L2") else "Linf"
        model, info = load_robustbench_model(cfg.robustbench_model, model_dir=cfg.model_dir,
                                             dataset=cfg.dataset or "cifar10", threat_model=board, device=device)
        return model, info, None
    source = Path(cfg.source)
    path = resolve_checkpoint(source, cfg.checkpoint) if source.is_dir() else source
    before = run_folder.file_identity(path)
    num_classes = NUM_CLASSES[cfg.dataset] if cfg.dataset else None
    with warnings.catch_warnings(record=True):  # the same text comes back in info["notes"], printed once
        model, info = load_model(cfg.source, weights=cfg.weights, checkpoint=cfg.checkpoint, arch=cfg.arch,
                                 num_classes=num_classes, arch_kwargs=cfg.arch_kwargs, device=device)
    run_folder.check_unchanged(info["path"], before, kept="nothing was evaluated yet")  # replaced while loading
    return model, info, before


def _points(cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The evaluated points and their description for the reports."""
    x, y = load_eval_data(cfg.dataset, cfg.split, cfg.data_dir, cfg.n_ex)
    data = {"dataset": cfg.dataset, "split": cfg.split, "n": len(y), "n_ex": cfg.n_ex, "data_dir": cfg.data_dir,
            "description": f"{cfg.dataset} {cfg.split} split, first {len(y)} points", "points": points_identity(x, y)}
    if cfg.n_ex is not None and cfg.n_ex > len(y):  # said in the summary line, report.json and report.md
        data["description"] = (f"{cfg.dataset} {cfg.split} split, all {len(y)} points (--n-ex {cfg.n_ex} asked "
                               "for more than the split holds)")
    return x, y, data


def _cache_identity(info: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """What identifies the evaluated model and points, for the resume cache."""
    path = Path(info["path"])
    stat = path.stat() if path.is_file() else None
    return {"model": {k: info.get(k) for k in ("path", "kind", "arch", "epoch", "global_step", "weights")},
            "file": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns} if stat else None,
            "data": {k: data[k] for k in ("dataset", "split", "n", "points")}}


def _radii_list(suites) -> list:
    """The radii a resume must match: floats for the usual single L-inf suite, else ``NORM:radius`` texts."""
    if len(suites) == 1 and suites[0].norm == "Linf":
        return list(suites[0].eps)
    return [f"{s.norm}:{eps_text(e, s.norm)}" for s in suites for e in s.eps]


def _busy(out: Path):
    def busy(pid: Optional[int]) -> str:
        who = f"process {pid}" if pid else "another process"
        return (f"--out {out} is in use by another evaluation or an export reading it ({who} holds "
                f"{out / '.lock'}): wait for it to end, or choose another --out")
    return busy


def _write_reports(result, out: Path, meta: dict[str, Any], sections: list[Any]) -> dict[str, Path]:
    """The reports; a failed write (a full disk) is one line, the finished results staying for a resume."""
    try:
        return write_reports(result, out, meta, sections)
    except OSError as e:
        raise write_failure(Path(e.filename or out), e, kept=f"the finished results in {out / 'cache'} are kept")


def _echo(cfg: EvalConfig, suites, info: dict[str, Any], data: dict[str, Any], out: Path) -> None:
    for note in info.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if cfg.quiet:
        return
    radii = " ".join(f"{s.norm} eps {' '.join(eps_text(e, s.norm) for e in s.eps)}" for s in suites)
    print(f"model {info.get('source')} ({info.get('arch')}, weights {info.get('weights')}, epoch "
          f"{info.get('epoch')}) | {data['description']} | {radii} | attacks "
          f"{' '.join(a.name for a in suites[0].attacks)}{' corruptions' if cfg.with_corruptions else ''} "
          f"| seed {suites[0].seed} | out {out}", file=sys.stderr)
