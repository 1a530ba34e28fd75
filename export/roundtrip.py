"""The maintainer's check: the exported zoo entry loads through RobustBench's own ``load_model``.

A RobustBench maintainer pastes ``ENTRY`` of ``zoo_entry.py`` into ``robustbench/model_zoo/<dataset>.py``
and calls ``robustbench.utils.load_model(model_name=NAME, model_dir=DIR, dataset=..., threat_model=...)``,
which builds the entry's model and reads ``DIR/<dataset>/<board>/NAME.pt`` (downloading it by
``gdrive_id`` only when the file is absent). :func:`load_as_maintainer` does exactly that with the
export's own files: the entry is executed from ``zoo_entry.py`` (the text that will be pasted) and
added to RobustBench's zoo for the duration of the call; the weights file must be in place, so
nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import io
import os
import runpy
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch.nn as nn

from core.device import module_device
from errors import UserError

from .arch import LOGIT_TOLERANCE, install_robustbench, max_logit_diff, probe_batch
from .weights import ExportMismatch

RB_ZOO_DATASETS = ("cifar10", "cifar100")  # RobustBench model-zoo datasets this project exports for


def read_zoo_entry(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(model_name, entry)`` of a ``zoo_entry.py`` written by the export, executed as Python."""
    entry = runpy.run_path(str(path)).get("ENTRY")
    if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], Mapping)):
        raise UserError(f"{path} defines no ENTRY = (name, {{'model': ..., 'gdrive_id': ...}}): write it with the export")
    return entry[0], dict(entry[1])


def weights_path(model_dir: str | os.PathLike, model_name: str, dataset: str, board: str) -> Path:
    """Where RobustBench's ``load_model`` reads the weights: ``DIR/<dataset>/<board>/NAME.pt``."""
    return Path(model_dir) / dataset / board / f"{model_name}.pt"


@contextlib.contextmanager
def zoo_with_entry(model_name: str, entry: Mapping[str, Any], dataset: str, board: str) -> Iterator[None]:
    """RobustBench's model zoo with ``entry`` added to the ``dataset`` / ``board`` list, as if pasted there.

    A name RobustBench already lists is refused: the submission needs a name of its own.
    """
    install_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    models = model_dicts[BenchmarkDataset(dataset)][ThreatModel(board)]
    if model_name in models:
        raise UserError(f"RobustBench's {dataset} {board} zoo already has a model named {model_name!r}: "
                        "choose another --model-name (Author2026Word_ARCH)")
    models[model_name] = dict(entry)
    try:
        yield
    finally:
        models.pop(model_name, None)


def load_as_maintainer(zoo_entry: str | os.PathLike, model_dir: str | os.PathLike, dataset: str,
                       board: str) -> nn.Module:
    """``robustbench.utils.load_model`` of the entry in ``zoo_entry`` from ``model_dir`` (eval mode, CPU).

    Raises ``UserError`` for a dataset without a RobustBench zoo or a missing weights file (that would
    start a download), ``ExportMismatch`` when RobustBench's loader fails on the export.
    """
    if dataset not in RB_ZOO_DATASETS:
        raise UserError(f"RobustBench has no {dataset} model zoo: its load_model cannot load this export")
    name, entry = read_zoo_entry(zoo_entry)
    path = weights_path(model_dir, name, dataset, board)
    if not path.is_file():
        raise UserError(f"{path} is missing: RobustBench's load_model would download it by gdrive_id; "
                        "export again into this folder")
    install_robustbench()
    from robustbench.utils import load_model

    with zoo_with_entry(name, entry, dataset, board), contextlib.redirect_stdout(io.StringIO()):
        try:
            model = load_model(model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=board)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ExportMismatch(f"robustbench.utils.load_model({name!r}, model_dir={str(model_dir)!r}, "
                                 f"dataset={dataset!r}, threat_model={board!r}) fails: "
                                 f"{' '.join(str(e).split())[:300]}") from None
    return model.eval()


def verify_as_maintainer(model: nn.Module, zoo_entry: str | os.PathLike, model_dir: str | os.PathLike, dataset: str,
                         board: str, *, n: int = 16, tolerance: float = LOGIT_TOLERANCE) -> float:
    """Load the export with :func:`load_as_maintainer` and compare its logits with ``model`` on ``n`` random
    images; returns the largest difference (``ExportMismatch`` at or above ``tolerance``)."""
    device = module_device(model)
    rb_model = load_as_maintainer(zoo_entry, model_dir, dataset, board).to(device)
    diff = max_logit_diff(model, rb_model, probe_batch(n, device))
    if not diff < tolerance:  # NaN fails too
        raise ExportMismatch(f"robustbench.utils.load_model gives {board} logits up to {diff:.3g} away from this "
                             f"project's model (limit {tolerance:g} in fp32)")
    return diff
