"""What one RobustBench export is asked to do (:class:`ExportRequest`), read by the planning and the export."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .claim import FULL_TEST_SET
from .model_info import ModelCard


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
    eval_json: Union[None, str, Sequence[str]] = None  # one or more report.json files
    allow_unevaluated: bool = False
    norm: Optional[str] = None  # one board only; default: every board the reports have results for
    eps: Optional[float] = None
    fmt: str = "pt"
    card: ModelCard = field(default_factory=ModelCard)
    claim: bool = False
    data_dir: Optional[str] = None
    claim_n: int = FULL_TEST_SET
    batch_size: int = 256
    device: str = "cpu"
    verify_n: int = 16
