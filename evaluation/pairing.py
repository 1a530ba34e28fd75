"""Which points a report was evaluated on, and whether two reports can be paired point by point.

``eval_autoattack.py`` records the dataset, split, number of points and SHA-256 digests of the
labels and images in ``report.json``; two evaluations pair (McNemar, paired intervals) only when
all of them agree. Used by the two-run compare and by the sweep summary.
"""
from __future__ import annotations

import torch

from errors import UserError

from .report import EvalReport

UNPAIRED_HINT = "or pass --unpaired"


def points_of(rep: EvalReport) -> dict[str, object]:
    """What identifies a report's points: dataset, split, n and the digests eval_autoattack.py records."""
    data = rep.raw.get("data") or {}
    points = data.get("points") or {}
    return {"dataset": rep.dataset, "split": rep.split, "n": rep.n,
            "labels_sha256": points.get("labels_sha256"), "images_sha256": points.get("images_sha256")}


def check_same_points(name_a: str, a: EvalReport, name_b: str, b: EvalReport, *, hint: str = UNPAIRED_HINT) -> None:
    """``UserError`` unless both reports hold per-point flags over the same points (``hint`` ends the message)."""
    for name, rep in ((name_a, a), (name_b, b)):
        if not isinstance(rep.raw.get("per_sample"), dict) or "clean" not in rep.raw["per_sample"]:
            raise UserError(f"cannot pair {name}: its report has no per-point flags (per_sample); rerun "
                            f"eval_autoattack.py on it with --resume (finished attacks are reused), {hint}")
    pa, pb = points_of(a), points_of(b)
    if pa["labels_sha256"] is None or pb["labels_sha256"] is None:
        missing = name_a if pa["labels_sha256"] is None else name_b
        raise UserError(f"cannot pair {name_a} and {name_b}: the report of {missing} does not identify its points "
                        f"(written before point digests); rerun eval_autoattack.py on it with --resume, {hint}")
    differ = [f"{k} {pa[k]} vs {pb[k]}" if k in ("dataset", "split", "n") else f"{k[:-7]} differ"
              for k in pa if pa[k] != pb[k]]
    if differ:
        raise UserError(f"cannot pair {name_a} and {name_b}: they were evaluated on different points "
                        f"({', '.join(differ)}); evaluate both on the same points (same --dataset, --split, "
                        f"--n-ex, data) {hint}")


def flags_of(bits: str) -> torch.Tensor:
    """A report's ``per_sample`` string of 0/1 as a bool tensor."""
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)
