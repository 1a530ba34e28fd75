"""Common corruptions (CIFAR-10-C / CIFAR-100-C): accuracy per corruption and severity, as RobustBench.

RobustBench's corruptions figure is the mean accuracy over the 15 corruptions x 5 severities, each
on the first ``n`` images of that severity (all 10,000 for the leaderboard); :func:`run_corruptions`
computes exactly that (``--attacks corruptions`` in eval_autoattack.py, ``--n-ex`` per corruption
and severity for quick runs). It is not an eps attack: it runs once, next to the eps suite, and
becomes the ``corruptions`` section of the report (tables, a heat map). Finished (corruption,
severity) pairs are cached in the evaluation's result store, so ``--resume`` continues.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from core.files import atomic_write
from data.corruptions import CORRUPTIONS, FOLDERS, SEVERITIES, CorruptedCifar
from errors import UserError

from .report import _markdown_table as markdown_table
from .runners import model_device, predict
from .store import ResultStore
from .suite import fp32_eval

CORRUPTIONS_ATTACK = "corruptions"  # its name in --attacks
RB_IMAGES_PER_SEVERITY = 10_000
FILES = {"corruptions": "table_corruptions.csv", "corruptions_long": "corruptions.csv",
         "corruptions_plot": "corruptions_heatmap.png"}


@dataclass(frozen=True)
class CorruptionSettings:
    """Which corruptions and severities to evaluate, on how many images each."""

    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    n_ex: Optional[int] = None  # first images per (corruption, severity); None: all
    batch_size: int = 256

    @classmethod
    def build(cls, corruptions: Optional[Sequence[str]] = None, severities: Optional[Sequence[int]] = None,
              **kw: Any) -> "CorruptionSettings":
        """Validate and put names and severities in RobustBench's order (``None``: all of them)."""
        names = list(corruptions) if corruptions else list(CORRUPTIONS)
        unknown = [c for c in names if c not in CORRUPTIONS]
        if unknown:
            raise UserError(f"unknown corruption(s) {', '.join(unknown)} in --corruptions; choose from: "
                            f"{', '.join(CORRUPTIONS)}")
        levels = list(severities) if severities else list(SEVERITIES)
        bad = [s for s in levels if s not in SEVERITIES]
        if bad:
            raise UserError(f"--severities {' '.join(map(str, bad))}: severities are 1 to 5")
        settings = cls(tuple(c for c in CORRUPTIONS if c in names), tuple(s for s in SEVERITIES if s in levels), **kw)
        if settings.n_ex is not None and settings.n_ex < 1:
            raise UserError(f"--n-ex must be a positive number of images, got {settings.n_ex}")
        return settings

    @property
    def complete(self) -> bool:
        """All 15 corruptions and 5 severities: the set RobustBench averages over."""
        return self.corruptions == CORRUPTIONS and self.severities == SEVERITIES

    def as_dict(self) -> dict[str, Any]:
        return {"corruptions": list(self.corruptions), "severities": list(self.severities), "n_ex": self.n_ex,
                "batch_size": self.batch_size}


@dataclass
class CorruptionResult:
    """Per-image correct flags for each evaluated (corruption, severity)."""

    settings: CorruptionSettings
    dataset: str
    folder: str
    available: int  # images per severity in the files
    correct: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    resumed: int = 0

    @property
    def n(self) -> int:
        """Images evaluated per (corruption, severity)."""
        return next((int(v.numel()) for v in self.correct.values()), 0)

    def accuracy(self, corruption: str, severity: int) -> float:
        flags = self.correct[(corruption, severity)]
        return flags.float().mean().item() if flags.numel() else float("nan")

    @property
    def mean(self) -> float:
        """Mean over the evaluated (corruption, severity) pairs of their accuracies (RobustBench's figure)."""
        values = [self.accuracy(c, s) for c, s in self.correct]
        return sum(values) / len(values) if values else float("nan")

    @property
    def robustbench_figure(self) -> bool:
        """True when :attr:`mean` is RobustBench's corruptions accuracy: all pairs, 10,000 images each."""
        return self.settings.complete and self.n == RB_IMAGES_PER_SEVERITY

    def table(self) -> pd.DataFrame:
        """Accuracy (%) with one row per corruption plus ``Mean``, one column per severity plus ``Mean``."""
        s = self.settings
        frame = pd.DataFrame({str(sev): [100 * self.accuracy(c, sev) for c in s.corruptions] for sev in s.severities},
                             index=list(s.corruptions))
        frame["Mean"] = frame.mean(axis=1)
        frame.loc["Mean"] = frame.mean(axis=0)
        frame.loc["Mean", "Mean"] = 100 * self.mean
        frame.index.name = "Corruption"
        return frame.round(2)

    def long_frame(self) -> pd.DataFrame:
        """One row per (corruption, severity): accuracy in [0, 1], correct count, images."""
        rows = [{"corruption": c, "severity": s, "accuracy": self.accuracy(c, s), "correct": int(f.sum()),
                 "n": int(f.numel())} for (c, s), f in self.correct.items()]
        return pd.DataFrame(rows, columns=["corruption", "severity", "accuracy", "correct", "n"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, the mean, and every pair's figures (read back by ``read_report``)."""
        return {"dataset": self.dataset, "data": FOLDERS[self.dataset], "folder": self.folder,
                "settings": self.settings.as_dict(), "n_per_severity": self.n, "available_per_severity": self.available,
                "complete": self.settings.complete, "robustbench_figure": self.robustbench_figure,
                "mean_accuracy": self.mean, "seconds": round(self.seconds, 3), "resumed": self.resumed,
                "results": self.long_frame().to_dict(orient="records")}


def run_corruptions(model: nn.Module, data: CorruptedCifar, settings: CorruptionSettings, *,
                    store: Optional[ResultStore] = None, progress: bool = True) -> CorruptionResult:
    """Accuracy of ``model`` on each (corruption, severity) of ``settings``, the first ``n_ex`` images each."""
    missing = [c for c in settings.corruptions if c not in data.corruptions]
    if missing:
        raise ValueError(f"the data was opened without {missing}")
    result = CorruptionResult(settings, data.dataset, str(data.folder), data.per_severity)
    device, n = model_device(model), data.count(settings.n_ex)
    pairs = [(c, s) for c in settings.corruptions for s in settings.severities]
    # What decides one pair's flags: its images (the files, their length) and how many; not which other
    # pairs run, so a resume with more corruptions or severities reuses the finished ones.
    decides = {"n": n, "folder": str(Path(data.folder).resolve()), "per_severity": data.per_severity}
    start = time.perf_counter()
    with fp32_eval(model, device), tqdm(total=n * len(pairs), desc="corruptions", unit="img", leave=False,
                                        disable=not progress) as bar:
        for corruption, severity in pairs:
            name = f"{CORRUPTIONS_ATTACK}:{corruption}:{severity}"
            key = store.key(name, [], decides) if store is not None else ""
            cached = store.load(name, 0.0, key) if store is not None else None
            if cached is not None:
                flags, result.resumed = cached["robust"].bool(), result.resumed + 1
            else:
                flags = torch.cat([(predict(model, x, settings.batch_size) == y).cpu() for x, y in
                                   data.batches(corruption, severity, n, settings.batch_size)])
                if store is not None:
                    store.save(name, 0.0, key, flags, attacked=n)
            result.correct[(corruption, severity)] = flags
            bar.update(n)
            bar.set_postfix(corruption=corruption, severity=severity)
    result.seconds = time.perf_counter() - start
    return result


def corruption_markdown(result: CorruptionResult) -> str:
    """The report's corruptions section: the table and what its mean is."""
    s = result.settings
    scope = ("RobustBench's corruptions accuracy" if result.robustbench_figure else
             "not RobustBench's figure, which averages all 15 corruptions x 5 severities on 10,000 images each")
    severities = f"{len(s.severities)} severit{'y' if len(s.severities) == 1 else 'ies'}"
    lines = [f"## Common corruptions: {FOLDERS[result.dataset]} (accuracy %)", "",
             f"- {len(s.corruptions)} corruption(s) x {severities}, first {result.n} of {result.available} images "
             f"each, from {result.folder}",
             f"- mean over the {len(result.correct)} pairs: **{100 * result.mean:.2f}%** ({scope})", "",
             markdown_table(result.table()), ""]
    return "\n".join(lines)


def plot_corruption_heatmap(result: CorruptionResult, path: str | Path) -> None:
    """PNG heat map of accuracy (%) per corruption (rows) and severity (columns), values written in."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = result.table().drop(index="Mean", columns="Mean")
    fig = Figure(figsize=(1.2 + 0.9 * table.shape[1], 1.0 + 0.35 * table.shape[0]), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(table.values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in pd.DataFrame(table.values).stack().items():
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                color="white" if value < 60 else "black")
    ax.set_xticks(range(table.shape[1]), [f"severity {c}" for c in table.columns], fontsize=8)
    ax.set_yticks(range(table.shape[0]), list(table.index), fontsize=8)
    ax.set_title(f"{FOLDERS[result.dataset]}: accuracy (%), mean {100 * result.mean:.2f}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


class CorruptionSection:
    """The corruptions part of a report (see ``evaluation.report.write_reports``)."""

    key = CORRUPTIONS_ATTACK

    def __init__(self, result: CorruptionResult) -> None:
        self.result = result

    def to_dict(self) -> dict[str, Any]:
        return self.result.to_dict()

    def markdown(self) -> str:
        return corruption_markdown(self.result)

    def summary(self) -> str:
        return f"{FOLDERS[self.result.dataset]} mean {self.result.mean:.2%} over {len(self.result.correct)} pairs"

    def write_files(self, out: Path) -> dict[str, Path]:
        paths = {kind: out / name for kind, name in FILES.items()}
        atomic_write(paths["corruptions"], lambda f: self.result.table().to_csv(f), binary=False)
        atomic_write(paths["corruptions_long"], lambda f: self.result.long_frame().to_csv(f, index=False),
                     binary=False)
        plot_corruption_heatmap(self.result, paths["corruptions_plot"])
        return paths
