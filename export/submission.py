"""RobustBench export: weights in RobustBench's key layout, model-zoo entry, ``model_info``, claim.

From a trained model :func:`export` writes what a RobustBench submission consists of:

* the weights as a plain state dict that RobustBench's own architecture class loads with
  ``strict=True`` (``wide_resnet.WideResNet``, ``dm_wide_resnet.DMWideResNet``,
  ``resnet.PreActResNet``), as ``.pt`` or ``.safetensors``, checked by comparing logits;
* the model-zoo entry to paste into ``robustbench/model_zoo/<dataset>.py`` (the constructor call);
* ``model_info`` JSON in the format of RobustBench's ``model_info/<dataset>/<threat>/<name>.json``;
* a claim: ``robustbench.eval.benchmark`` run on the exported file itself, offline.

The layout mirrors RobustBench's repository: ``OUT/models/<dataset>/<threat>/<name>.pt`` and
``OUT/model_info/<dataset>/<threat>/<name>.json``, next to ``zoo_entry.py`` and ``export.json``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch.nn as nn

from checkpoints.run import default_out_dir
from core.device import module_device, resolve_device
from core.files import atomic_write_text
from core.provenance import now_iso
from core.threat import NORMS, eps_text, parse_eps
from errors import UserError

from .arch import RobustBenchArch, robustbench_arch, zoo_entry_source
from .claim import FULL_TEST_SET, RB_DATASETS, claim_data_root, run_claim
from .model_info import (
    Figures,
    ModelCard,
    build_model_info,
    check_report_model,
    figures_from_report,
    pct,
    validate_model_info,
)
from .weights import (
    LOGIT_TOLERANCE,
    file_sha256,
    robustbench_state_dict,
    save_weights,
    verify_export,
)

FORMATS = ("pt", "safetensors")
WEIGHT_CHOICES = ("avg", "raw", "last", "best")
THREAT_MODELS = NORMS
STANDARD_EPS = {"Linf": 8 / 255, "L2": 0.5}


@dataclass
class ExportRequest:
    """Everything one export needs; ``export_robustbench.py`` fills it from the command line."""

    source: str
    out: Optional[str] = None
    weights: str = "avg"  # avg | raw (of --checkpoint) | last (raw last.pt) | best (best.pt as selected)
    checkpoint: Optional[str] = None
    arch: Optional[str] = None
    dataset: Optional[str] = None
    model_name: Optional[str] = None
    eval_json: Optional[str] = None
    allow_unevaluated: bool = False
    norm: Optional[str] = None
    eps: Optional[float] = None
    fmt: str = "pt"
    card: ModelCard = field(default_factory=ModelCard)
    claim: bool = False
    data_dir: Optional[str] = None
    claim_n: int = FULL_TEST_SET
    batch_size: int = 256
    device: str = "cpu"
    verify_n: int = 16


@dataclass
class ExportResult:
    """Paths written, the verification figure, the model_info written and notes for the user."""

    out: Path
    weights: Path
    model_info_path: Path
    zoo_entry: Path
    record: Path
    claim_path: Optional[Path]
    max_abs_diff: float
    model_info: dict[str, Any]
    claim: Optional[dict[str, Any]]
    notes: list[str]


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def default_out(source: str | os.PathLike) -> Path:
    """``RUN/robustbench`` for a run folder (or a file in one), else ``robustbench_<stem>`` beside the file."""
    return default_out_dir(source, "robustbench")


def default_model_name(source: str | os.PathLike) -> str:
    """The run folder's (or file's) name with characters outside ``[A-Za-z0-9_.-]`` made ``_``."""
    src = Path(source).resolve()
    if src.is_file():
        src = src.parent.parent if src.parent.name == "checkpoints" else src.with_suffix("")
    return "".join(c if c in _NAME_CHARS else "_" for c in src.name) or "model"


@dataclass
class _Plan:
    """Everything read and checked before the first file is written."""

    model: nn.Module
    info: dict[str, Any]
    arch: RobustBenchArch
    config: dict[str, Any]
    dataset: str
    norm: str
    eps: float
    evaluated: Optional[Figures]
    claim_data: Optional[tuple[Path, int]]
    name: str
    out: Path


def export(req: ExportRequest) -> ExportResult:
    """Write weights, zoo entry, model_info (and claim) for ``req``; see the module docstring.

    Raises ``UserError`` for bad input (before anything is written) and ``ExportMismatch`` when
    the written weights do not reproduce the model in RobustBench's class.
    """
    plan = _plan(req)
    out, name, arch = plan.out, plan.name, plan.arch
    weights = out / "models" / plan.dataset / plan.norm / f"{name}.{req.fmt}"
    save_weights(robustbench_state_dict(plan.model), weights, metadata={
        "format": "robustbench-state-dict", "constructor": arch.call_source(), "dataset": plan.dataset})
    diff = verify_export(plan.model, arch, weights, n=req.verify_n)
    zoo_entry = out / "zoo_entry.py"
    atomic_write_text(zoo_entry, zoo_entry_source(name, arch, plan.dataset, plan.norm))
    claim = claim_path = None
    if plan.claim_data is not None:
        root, size = plan.claim_data
        claim = {"model_name": name, **run_claim(
            arch, weights, dataset=plan.dataset, data_root=root, norm=plan.norm, eps=plan.eps,
            n_examples=min(req.claim_n, size), batch_size=req.batch_size, device=module_device(plan.model),
            work_dir=out)}
        claim_path = out / "claim.json"
        atomic_write_text(claim_path, json.dumps(claim, indent=2) + "\n")
    figures = _claim_figures(claim, plan.eps, plan.norm, claim_path) if claim else plan.evaluated
    model_info = _model_info(req.card, plan.dataset, arch, plan.eps, plan.norm, figures)
    info_path = out / "model_info" / plan.dataset / plan.norm / f"{name}.json"
    atomic_write_text(info_path, json.dumps(model_info, indent=2) + "\n")
    notes = _notes(req, plan.dataset, plan.config, plan.evaluated, claim)
    record = out / "export.json"
    atomic_write_text(record, json.dumps(_record(req, plan, weights, diff, claim, notes), indent=2, default=str) + "\n")
    return ExportResult(out, weights, info_path, zoo_entry, record, claim_path, diff, model_info, claim, notes)


def _plan(req: ExportRequest) -> _Plan:
    _check_request(req)
    model, info = _load_for_export(req)
    arch = robustbench_arch(model, str(info.get("arch") or ""))
    config = dict(info.get("config") or {})
    dataset = req.dataset or info.get("dataset") or config.get("dataset")
    if dataset is None:
        raise UserError("cannot tell which dataset this model was trained on: pass --dataset")
    norm, eps = _threat_model(req, config)
    evaluated = _evaluation(req, info, dataset, norm, eps)
    claim_data = claim_data_root(dataset, req.data_dir or config.get("data_dir") or "./datasets") if req.claim \
        else None
    return _Plan(model, dict(info), arch, config, dataset, norm, eps, evaluated, claim_data,
                 req.model_name or default_model_name(req.source),
                 Path(req.out) if req.out else default_out(req.source))


def _check_request(req: ExportRequest) -> None:
    if req.fmt not in FORMATS:
        raise UserError(f"--format {req.fmt!r} is not one of: {', '.join(FORMATS)}")
    if req.weights not in WEIGHT_CHOICES:
        raise UserError(f"--weights {req.weights!r} is not one of: {', '.join(WEIGHT_CHOICES)}")
    if req.norm is not None and req.norm not in THREAT_MODELS:
        raise UserError(f"--norm {req.norm!r} is not one of: {', '.join(THREAT_MODELS)}")
    if req.model_name is not None and (not req.model_name or set(req.model_name) - _NAME_CHARS):
        raise UserError(f"--model-name {req.model_name!r} may only use letters, digits, '_', '-' and '.' "
                        "(RobustBench names look like Author2024Title_WRN-34-10)")
    for flag, value in (("--claim-n", req.claim_n), ("--batch-size", req.batch_size), ("--verify-n", req.verify_n),
                        ("--forward-passes", req.card.number_forward_passes)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
    if req.card.reported is not None and not 0 <= req.card.reported <= 100:
        raise UserError(f"--reported is a percentage in [0, 100], got {req.card.reported}")


def _load_for_export(req: ExportRequest) -> tuple[nn.Module, dict[str, Any]]:
    from checkpoints.run import load_model
    from data import NUM_CLASSES

    checkpoint, kind = req.checkpoint or "last", req.weights
    if req.weights in ("last", "best"):
        if req.checkpoint not in (None, req.weights):
            raise UserError(f"--weights {req.weights} means checkpoints/{req.weights}.pt: drop --checkpoint "
                            f"{req.checkpoint}, or use --weights avg|raw with it")
        # last: the final iterate; best: best.pt with the weights its selection measured (averaged if any)
        checkpoint, kind = req.weights, ("raw" if req.weights == "last" else "avg")
    if req.dataset is not None and req.dataset not in NUM_CLASSES:
        raise UserError(f"--dataset {req.dataset!r} is not one of: {', '.join(NUM_CLASSES)}")
    num_classes = NUM_CLASSES[req.dataset] if req.dataset else None
    return load_model(req.source, weights=kind, checkpoint=checkpoint, arch=req.arch,
                      num_classes=num_classes, device=resolve_device(req.device))


def _threat_model(req: ExportRequest, config: Mapping[str, Any]) -> tuple[str, float]:
    """``--norm``/``--eps``, else the training run's, else RobustBench's standard (8/255, 0.5)."""
    norm = req.norm or config.get("norm") or "Linf"
    if req.eps is not None:
        return norm, float(req.eps)
    if config.get("eps") is not None and config.get("norm", "Linf") == norm:
        return norm, parse_eps(config["eps"])
    return norm, STANDARD_EPS[norm]


def _evaluation(req: ExportRequest, info: Mapping[str, Any], dataset: str, norm: str,
                eps: float) -> Optional[Figures]:
    from evaluation.report import read_report

    path = Path(req.eval_json) if req.eval_json else default_out_dir(req.source, "eval") / "report.json"
    if not path.is_file():
        if req.eval_json:
            raise UserError(f"--eval-json {path} does not exist: pass the report.json of eval_autoattack.py")
        if req.allow_unevaluated or req.claim:
            return None
        raise UserError(f"no evaluation found at {path}: run eval_autoattack.py {req.source} --attacks aa first "
                        "(or pass --eval-json REPORT, --claim, or --allow-unevaluated)")
    report = read_report(path)
    check_report_model(report, info)
    return figures_from_report(report, dataset=dataset, norm=norm, eps=eps)


def _claim_figures(claim: Mapping[str, Any], eps: float, norm: str, path: Optional[Path]) -> Figures:
    return Figures(clean=claim["clean_accuracy"], autoattack=claim["autoattack_accuracy"],
                   n=claim["n_examples"], eps=eps, norm=norm, source=str(path))


def _model_info(card: ModelCard, dataset: str, arch: RobustBenchArch, eps: float, norm: str,
                figures: Optional[Figures]) -> dict[str, Any]:
    model_info = build_model_info(card, dataset=dataset, architecture=arch.display, eps=eps, norm=norm,
                                  figures=figures)
    problems = validate_model_info(model_info, evaluated=figures is not None)
    if problems:
        raise UserError(f"model_info would be invalid: {'; '.join(problems)}")
    return model_info


def _notes(req: ExportRequest, dataset: str, config: Mapping[str, Any], evaluated: Optional[Figures],
           claim: Optional[Mapping[str, Any]]) -> list[str]:
    notes = []
    if dataset not in RB_DATASETS:
        notes.append(f"RobustBench has no {dataset} leaderboard: the model_info is for reference only")
    figures_n = claim["n_examples"] if claim else (evaluated.n if evaluated else None)
    if figures_n is None:
        notes.append("model_info has no accuracies (unevaluated): run eval_autoattack.py or --claim before submitting")
    elif figures_n < FULL_TEST_SET and dataset in RB_DATASETS:
        notes.append(f"accuracies come from {figures_n} test points; RobustBench reports all {FULL_TEST_SET}: "
                     "evaluate without --n-ex (or --claim with the default --claim-n) before submitting")
    if claim and evaluated:
        notes.append(f"claim (RobustBench, n={claim['n_examples']}): clean {claim['clean_acc']}%, AA "
                     f"{claim['autoattack_acc']}%; eval_autoattack (n={evaluated.n}): clean {pct(evaluated.clean)}%, "
                     f"AA {pct(evaluated.autoattack)}%; model_info uses the claim")
    missing = req.card.missing()
    if missing:
        notes.append(f"model_info fields left empty: {', '.join(missing)} (pass --{' --'.join(missing)})")
    if config.get("generated") and not req.card.footnote:
        notes.append("the run trained on generated data: say so with --footnote, e.g. \"It uses additional "
                     "50M synthetic images in training.\"")
    return notes


def _record(req: ExportRequest, plan: _Plan, weights: Path, diff: float,
            claim: Optional[Mapping[str, Any]], notes: list[str]) -> dict[str, Any]:
    """Provenance of the export: what was taken from where, and how it was checked."""
    info, evaluated = plan.info, plan.evaluated
    return {"created": now_iso(), "model_name": plan.name, "source": req.source, "checkpoint": info.get("path"),
            "weights_kind": info.get("weights"), "weights_choice": req.weights, "arch": info.get("arch"),
            "epoch": info.get("epoch"), "global_step": info.get("global_step"),
            "robustbench_constructor": plan.arch.call_source(), "weights_file": str(weights), "format": req.fmt,
            "weights_sha256": file_sha256(weights),
            "verification": {"max_abs_logit_diff": diff, "tolerance": LOGIT_TOLERANCE, "inputs": req.verify_n,
                             "strict_load": True, "dtype": "float32"},
            "dataset": plan.dataset, "threat_model": plan.norm, "eps": eps_text(plan.eps, plan.norm),
            "evaluation": None if evaluated is None else {
                "report": evaluated.source, "n": evaluated.n, "clean_accuracy": evaluated.clean,
                "autoattack_accuracy": evaluated.autoattack},
            "claim": None if claim is None else {k: claim[k] for k in ("n_examples", "clean_accuracy",
                                                                       "autoattack_accuracy")},
            "model_info_figures": "claim" if claim else ("evaluation" if evaluated else None), "notes": notes}
