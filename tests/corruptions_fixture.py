"""A tiny CIFAR-10-C / CIFAR-100-C in the layout the archives ship in (written by the tests).

``DIR/CIFAR-10-C/<corruption>.npy`` holds the five severities stacked (``5 * m`` images, 32x32x3
uint8, severity ``s`` in rows ``(s - 1) * m`` to ``s * m``) and ``labels.npy`` the ``5 * m``
labels, as in the published files (where m = 10,000). Each image is one grey level,
``encode(corruption index, severity)``, so a model can tell which block it was given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

FOLDER = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}


def encode(corruption_index: int, severity: int) -> int:
    """The grey level of every image of (corruption, severity): 40 * severity + 2 * index."""
    return 40 * severity + 2 * corruption_index


def write_fake_cifar_c(root: Path, corruptions: Sequence[str], per_severity: int, labels: Optional[np.ndarray] = None,
                       dataset: str = "cifar10", seed: int = 0) -> Path:
    """Write the folder under ``root``; returns it. ``labels`` default: random, different per severity."""
    folder = Path(root) / FOLDER[dataset]
    folder.mkdir(parents=True, exist_ok=True)
    n = 5 * per_severity
    if labels is None:
        labels = np.random.default_rng(seed).integers(0, 10, n)
    np.save(folder / "labels.npy", np.asarray(labels, dtype=np.uint8))  # the published file is uint8 too
    for index, name in enumerate(corruptions):
        levels = np.repeat([encode(index, s) for s in range(1, 6)], per_severity).astype(np.uint8)
        np.save(folder / f"{name}.npy", np.broadcast_to(levels[:, None, None, None], (n, 32, 32, 3)).copy())
    return folder


class ConstantModel(nn.Module):
    """Predicts ``label`` for every input (a parameter keeps ``model_device`` and attack_mode working)."""

    def __init__(self, label: int, num_classes: int = 10) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(label), num_classes).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


class DecodingModel(nn.Module):
    """Predicts ``severity - 1 + 5 * (corruption index % 2)``, decoded from the images' grey level."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = (x.flatten(1).mean(1) * 255 * self.scale).round().long()
        severity, index = level // 40, (level % 40) // 2
        return torch.nn.functional.one_hot(severity - 1 + 5 * (index % 2), 10).float()
