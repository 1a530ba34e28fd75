"""RobustBench export: weights in RobustBench's key layout, model-zoo entry, ``model_info``, claim.

From a trained model :func:`export` writes what a RobustBench submission consists of:

* the weights as a plain state dict that RobustBench's own architecture class loads with
  ``strict=True`` (``wide_resnet.WideResNet``, ``dm_wide_resnet.DMWideResNet``,
  ``resnet.PreActResNet``), as ``.pt`` or ``.safetensors``, checked by comparing logits;
* the model-zoo entry to paste into ``robustbench/model_zoo/<dataset>.py`` (the constructor call),
  once per board (``linf``, ``l2``, ``common_corruptions`` lists);
* ``model_info`` JSON in the format of RobustBench's ``model_info/<dataset>/<board>/<name>.json``,
  one per board that the evaluation has results for (Linf, L2, corruptions), each filled from that
  board's own part of the report;
* a claim: ``robustbench.eval.benchmark`` run on the exported file itself, offline, for each board.

The layout mirrors RobustBench's repository: ``OUT/models/<dataset>/<board>/<name>.pt`` (one file,
hard-linked into each board's folder) and ``OUT/model_info/<dataset>/<board>/<name>.json``, next to
``zoo_entry.py``, ``export.json`` and ``claim.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch.nn as nn

from checkpoints.run import default_out_dir
from core.device import module_device, resolve_device
from core.files import atomic_write_text
from core.flags import check_count
from core.provenance import now_iso
from core.threat import eps_text, parse_eps
from errors import UserError

from .arch import RobustBenchArch, robustbench_arch, zoo_entry_source
from .boards import (
    CORRUPTIONS_BOARD,
    THREAT_MODELS,
    BoardFigures,
    CorruptionFigures,
    Figures,
)
from .claim import FULL_TEST_SET, RB_DATASETS, claim_corruptions_root, claim_data_root, run_claim
from .model_info import (
    ModelCard,
    build_corruptions_info,
    build_model_info,
    pct,
    validate_model_info,
)
from .planning import BoardPlan, plan_boards
from .request import ExportRequest
from .roundtrip import RB_ZOO_DATASETS, verify_as_maintainer
from .weights import LOGIT_TOLERANCE, file_sha256, robustbench_state_dict, save_weights, verify_export

FORMATS = ("pt", "safetensors")
WEIGHT_CHOICES = ("avg", "raw", "last", "best")


@dataclass
class BoardExport:
    """What was written for one board."""

    board: str
    eps: Optional[float]
    model_info_path: Path
    model_info: dict[str, Any]
    weights: Path
    claim: Optional[dict[str, Any]] = None


@dataclass
class ExportResult:
    """Paths written, the verification figure, the model_info of each board and notes for the user.

    ``model_info`` / ``model_info_path`` / ``claim`` are the first board's (``boards`` has them all).
    """

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
    boards: dict[str, BoardExport] = field(default_factory=dict)
    maintainer_check: dict[str, Any] = field(default_factory=dict)  # robustbench.utils.load_model, per board


MODEL_NAME_LIMIT = 100  # file names get suffixes; RobustBench's own names are under 60 characters
VERIFY_LIMIT = 4096  # random inputs of the logit check, held in memory at once
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
    boards: list[BoardPlan]
    name: str
    out: Path
    notes: list[str]


def export(req: ExportRequest) -> ExportResult:
    """Write weights, zoo entry, model_info (and claim) for ``req``; see the module docstring.

    Raises ``UserError`` for bad input (before anything is written) and ``ExportMismatch`` when
    the written weights do not reproduce the model in RobustBench's class or through its ``load_model``.
    """
    plan = _plan(req)
    out, name, arch = plan.out, plan.name, plan.arch
    files = _write_weights(req, plan)
    weights = files[-1]  # the requested format's file (the .pt comes first: RobustBench's load_model reads it)
    diff = verify_export(plan.model, arch, weights, n=req.verify_n)
    zoo_entry = out / "zoo_entry.py"
    atomic_write_text(zoo_entry, zoo_entry_source(name, arch, plan.dataset, [b.board for b in plan.boards]))
    for board in plan.boards[1:]:
        for file in files:
            _link(file, out / "models" / plan.dataset / board.board / file.name)
    maintainer = _verify_as_maintainer(req, plan, zoo_entry)
    done = {b.board: _export_board(req, plan, b, weights, zoo_entry, first=i == 0) for i, b in enumerate(plan.boards)}
    claims = {k: v.claim for k, v in done.items() if v.claim is not None}
    claim_path = None
    if claims:
        claim_path = out / "claim.json"
        atomic_write_text(claim_path, json.dumps({"model_name": name, "boards": claims}, indent=2) + "\n")
    notes = plan.notes + _notes(req, plan, claims)
    record = out / "export.json"
    atomic_write_text(record, json.dumps(_record(req, plan, files, diff, maintainer, done, notes), indent=2,
                                         default=str) + "\n")
    first = done[plan.boards[0].board]
    return ExportResult(out, weights, first.model_info_path, zoo_entry, record, claim_path, diff, first.model_info,
                        first.claim, notes, done, maintainer)


def _write_weights(req: ExportRequest, plan: _Plan) -> list[Path]:
    """``NAME.pt`` in the first board's folder (what RobustBench's ``load_model`` reads) and, with
    ``--format safetensors``, ``NAME.safetensors`` beside it (the same tensors)."""
    folder = plan.out / "models" / plan.dataset / plan.boards[0].board
    state = robustbench_state_dict(plan.model)
    metadata = {"format": "robustbench-state-dict", "constructor": plan.arch.call_source(), "dataset": plan.dataset}
    return [save_weights(state, folder / f"{plan.name}.{fmt}", metadata=metadata)
            for fmt in dict.fromkeys(["pt", req.fmt])]


def _verify_as_maintainer(req: ExportRequest, plan: _Plan, zoo_entry: Path) -> dict[str, Any]:
    """Each board's export through ``robustbench.utils.load_model`` with the written zoo entry: the largest
    logit difference per board, or why it was not run (no RobustBench zoo for the dataset)."""
    if plan.dataset not in RB_ZOO_DATASETS:
        return {"loader": None, "skipped": f"RobustBench has no {plan.dataset} model zoo"}
    diffs = {b.board: verify_as_maintainer(plan.model, zoo_entry, plan.out / "models", plan.dataset, b.board,
                                           n=req.verify_n) for b in plan.boards}
    return {"loader": "robustbench.utils.load_model", "model_dir": str(plan.out / "models"),
            "max_abs_logit_diff": diffs}


def _export_board(req: ExportRequest, plan: _Plan, board: BoardPlan, weights: Path, zoo_entry: Path,
                  first: bool) -> BoardExport:
    """The board's claim and model_info (its weights are linked into its folder already)."""
    path = plan.out / "models" / plan.dataset / board.board / weights.name
    claim = None
    if board.claim_data is not None:
        root, size = board.claim_data
        claim = run_claim(plan.arch, zoo_entry, plan.out / "models", dataset=plan.dataset, data_root=root,
                          norm=board.board, eps=board.eps, n_examples=min(req.claim_n, size),
                          batch_size=req.batch_size, device=module_device(plan.model), work_dir=plan.out,
                          corruptions_root=board.corruptions_root)
    figures = _claim_figures(claim, board) if claim else board.evaluated
    card = req.card if first else dataclasses.replace(req.card, reported=None)  # --reported: the first board's
    model_info = _model_info(card, plan.dataset, plan.arch, board, figures)
    info_path = plan.out / "model_info" / plan.dataset / board.board / f"{plan.name}.json"
    atomic_write_text(info_path, json.dumps(model_info, indent=2) + "\n")
    return BoardExport(board.board, board.eps, info_path, model_info, path, claim)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # no hard links on this file system
        shutil.copyfile(source, target)


def _plan(req: ExportRequest) -> _Plan:
    _check_request(req)
    model, info = _load_for_export(req)
    arch = robustbench_arch(model, str(info.get("arch") or ""))
    config = dict(info.get("config") or {})
    dataset = req.dataset or info.get("dataset") or config.get("dataset")
    if dataset is None:
        raise UserError("cannot tell which dataset this model was trained on: pass --dataset")
    notes: list[str] = []
    boards = plan_boards(req, info, config, dataset, notes)
    data_dir = req.data_dir or config.get("data_dir") or "./datasets"
    if req.claim:
        for board in boards:
            board.claim_data = claim_data_root(dataset, data_dir)
            if board.board == CORRUPTIONS_BOARD:
                board.corruptions_root = claim_corruptions_root(dataset, data_dir)
    return _Plan(model, dict(info), arch, config, dataset, boards, req.model_name or default_model_name(req.source),
                 Path(req.out) if req.out else default_out(req.source), notes)


def _check_request(req: ExportRequest) -> None:
    if req.fmt not in FORMATS:
        raise UserError(f"--format {req.fmt!r} is not one of: {', '.join(FORMATS)}")
    if req.weights not in WEIGHT_CHOICES:
        raise UserError(f"--weights {req.weights!r} is not one of: {', '.join(WEIGHT_CHOICES)}")
    if req.norm is not None and req.norm not in THREAT_MODELS:
        raise UserError(f"--norm {req.norm!r} is not one of RobustBench's boards: {', '.join(THREAT_MODELS)}")
    if req.norm == CORRUPTIONS_BOARD and req.eps is not None:
        raise UserError("--eps has no meaning for the corruptions board: drop it")
    name = req.model_name
    if name is not None and (not name or set(name) - _NAME_CHARS or not name[0].isalnum()
                             or len(name) > MODEL_NAME_LIMIT):
        raise UserError(f"--model-name {name[:40]!r}{'...' if len(name) > 40 else ''} must start with a letter "
                        f"or digit, use only letters, digits, '_', '-' and '.', and have at most {MODEL_NAME_LIMIT} "
                        "characters (RobustBench names look like Author2024Title_WRN-34-10)")
    for flag, value, limit in (("--claim-n", req.claim_n, 10**7), ("--batch-size", req.batch_size, 1 << 20),
                               ("--verify-n", req.verify_n, VERIFY_LIMIT),
                               ("--forward-passes", req.card.number_forward_passes, 10**6)):
        if value < 1:
            raise UserError(f"{flag} must be a positive integer, got {value}")
        check_count(flag, value, limit)
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


def _claim_figures(claim: Mapping[str, Any], board: BoardPlan) -> BoardFigures:
    if board.board == CORRUPTIONS_BOARD:
        return CorruptionFigures(clean=claim["clean_accuracy"], corruptions=claim["corruptions_accuracy"],
                                 n=claim["n_examples"], source="claim")
    return Figures(clean=claim["clean_accuracy"], autoattack=claim["autoattack_accuracy"], n=claim["n_examples"],
                   eps=float(board.eps or 0.0), norm=board.board, source="claim", implementation=claim["autoattack"])


def _model_info(card: ModelCard, dataset: str, arch: RobustBenchArch, board: BoardPlan,
                figures: Optional[BoardFigures]) -> dict[str, Any]:
    if board.board == CORRUPTIONS_BOARD:
        assert figures is None or isinstance(figures, CorruptionFigures)
        model_info = build_corruptions_info(card, dataset=dataset, architecture=arch.display, figures=figures)
    else:
        assert (figures is None or isinstance(figures, Figures)) and board.eps is not None
        model_info = build_model_info(card, dataset=dataset, architecture=arch.display, eps=board.eps,
                                      norm=board.board, figures=figures)
        if figures is not None and figures.implementation:  # which AutoAttack measured autoattack_acc
            model_info["autoattack_implementation"] = figures.implementation
    problems = validate_model_info(model_info, evaluated=figures is not None, board=board.board)
    if problems:
        raise UserError(f"model_info would be invalid: {'; '.join(problems)}")
    return model_info


def _figure_line(figures: BoardFigures) -> str:
    if isinstance(figures, CorruptionFigures):
        return f"clean {pct(figures.clean)}%, corruptions {pct(figures.corruptions)}% (n={figures.n} per pair)"
    return f"clean {pct(figures.clean)}%, AA {pct(figures.autoattack)}% (n={figures.n})"


def _notes(req: ExportRequest, plan: _Plan, claims: Mapping[str, Mapping[str, Any]]) -> list[str]:
    notes, dataset = [], plan.dataset
    if dataset not in RB_DATASETS:
        notes.append(f"RobustBench has no {dataset} leaderboard: the model_info is for reference only")
    for board in plan.boards:
        claim, evaluated = claims.get(board.board), board.evaluated
        figures_n = claim["n_examples"] if claim else (evaluated.n if evaluated else None)
        full = FULL_TEST_SET  # test images for Linf / L2, images per (corruption, severity) for corruptions
        if figures_n is None:
            notes.append(f"{board.board} model_info has no accuracies (unevaluated): run eval_autoattack.py or "
                         "--claim before submitting")
        elif figures_n < full and dataset in RB_DATASETS:
            notes.append(f"{board.board} accuracies come from {figures_n} images; RobustBench uses all {full}"
                         + (" per corruption and severity" if board.board == CORRUPTIONS_BOARD else "")
                         + ": evaluate without --n-ex (or --claim with the default --claim-n) before submitting")
        external = evaluated.external if isinstance(evaluated, Figures) else None
        if external is not None:
            notes.append(f"{board.board}: {external.attack} broke {external.only_malt_broke} point(s) that standard "
                         f"AutoAttack left robust (AutoAttack broke {external.only_autoattack_broke} MALT left "
                         f"robust): " + ("the claim ran AutoAttack only, so model_info has no external figure"
                                         if claim else f"model_info external {pct(external.accuracy)} beside "
                                         f"autoattack_acc {pct(evaluated.autoattack)}, named in the footnote"))
        if claim and evaluated:
            notes.append(f"{board.board} claim (RobustBench, n={claim['n_examples']}): "
                         f"{_figure_line(_claim_figures(claim, board))}; eval_autoattack: {_figure_line(evaluated)}; "
                         "model_info uses the claim")
    missing = req.card.missing()
    if missing:
        notes.append(f"model_info fields left empty: {', '.join(missing)} (pass --{' --'.join(missing)})")
    if plan.config.get("generated") and not req.card.footnote:
        notes.append("the run trained on generated data: say so with --footnote, e.g. \"It uses additional "
                     "50M synthetic images in training.\"")
    if any(b.board == CORRUPTIONS_BOARD for b in plan.boards) and plan.config.get("norm") and not req.card.footnote:
        eps = plan.config.get("eps")
        text = f" with eps {eps_text(parse_eps(eps, plan.config['norm']), plan.config['norm'])}" if eps else ""
        notes.append(f"the corruptions board shows how a model was trained: e.g. --footnote \"Trained for "
                     f"{plan.config['norm']} robustness{text}.\"")
    return notes


def _record(req: ExportRequest, plan: _Plan, files: list[Path], diff: float, maintainer: Mapping[str, Any],
            done: Mapping[str, BoardExport], notes: list[str]) -> dict[str, Any]:
    """Provenance of the export: what was taken from where, and how it was checked."""
    info = plan.info
    boards = {}
    for board in plan.boards:
        evaluated, claim = board.evaluated, done[board.board].claim
        boards[board.board] = {
            "eps": None if board.eps is None else eps_text(board.eps, board.board),
            "model_info": str(done[board.board].model_info_path), "weights_file": str(done[board.board].weights),
            "evaluation": None if evaluated is None else {"report": evaluated.source, **_figure_dict(evaluated)},
            "claim": None if claim is None else {k: v for k, v in claim.items()
                                                 if k in ("n_examples", "clean_accuracy", "autoattack_accuracy",
                                                          "corruptions_accuracy")},
            "model_info_figures": "claim" if claim else ("evaluation" if evaluated else None)}
    return {"created": now_iso(), "model_name": plan.name, "source": req.source, "checkpoint": info.get("path"),
            "weights_kind": info.get("weights"), "weights_choice": req.weights, "arch": info.get("arch"),
            "epoch": info.get("epoch"), "global_step": info.get("global_step"),
            "robustbench_constructor": plan.arch.call_source(), "weights_file": str(files[-1]), "format": req.fmt,
            "weights_sha256": file_sha256(files[-1]), "files_sha256": {f.name: file_sha256(f) for f in files},
            "verification": {"max_abs_logit_diff": diff, "tolerance": LOGIT_TOLERANCE, "inputs": req.verify_n,
                             "strict_load": True, "dtype": "float32", "robustbench_load_model": dict(maintainer)},
            "dataset": plan.dataset, "boards": boards, "notes": notes}


def _figure_dict(figures: BoardFigures) -> dict[str, Any]:
    if isinstance(figures, CorruptionFigures):
        return {"n_per_pair": figures.n, "clean_accuracy": figures.clean, "corruptions_accuracy": figures.corruptions}
    return {"n": figures.n, "clean_accuracy": figures.clean, "autoattack_accuracy": figures.autoattack}
