"""Statistics of accuracies measured on a finite set of points: Wilson intervals and paired comparisons.

An accuracy over ``n`` points is a binomial proportion; :func:`wilson` gives its 95% score interval
(Wilson 1927; ``scipy.stats.binomtest``), which keeps its coverage near 0 and 1 where the normal
approximation fails. Two models evaluated on the same points are compared point by point: the 2x2
table of their flags (:class:`PairedTable`) gives the paired difference with Newcombe's hybrid score
interval (method 10 of Newcombe 1998, Statistics in Medicine 17:2635-2650; no library has it) and
the exact McNemar test (scipy's two-sided binomial test of the points only one model gets right).
Pairing is what makes a +0.5 point gain on 10,000 points testable: the points both models get right
or wrong carry no noise.

Also here: per-class clean and worst-case robust accuracy of a suite result.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from core.threat import eps_text

if TYPE_CHECKING:
    from .results import SuiteResult

@functools.lru_cache(maxsize=4096)  # reports ask for the same (k, n) many times; scipy's test costs ~1 ms
def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (nan, nan for ``n = 0``); exactly 0 / 1 at k = 0 / n."""
    from scipy.stats import binomtest  # scipy.stats takes seconds to import: only when an interval is asked for

    if n <= 0:
        return float("nan"), float("nan")
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (0.0 if k == 0 else float(ci.low)), (1.0 if k == n else float(ci.high))


def ci_cell(k: int, n: int) -> str:
    """``"45.00 [39.12, 51.03]"``: the percentage and its 95% Wilson interval, for Markdown tables."""
    if n <= 0:
        return "nan"
    low, high = wilson(k, n)
    return f"{100 * k / n:.2f} [{100 * low:.2f}, {100 * high:.2f}]"


def binomial_two_sided(k: int, m: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``m`` fair coin flips: 2 P(X <= min(k, m - k)), at most 1."""
    from scipy.stats import binomtest

    return 1.0 if m == 0 else float(binomtest(k, m, 0.5).pvalue)


@dataclass(frozen=True)
class PairedTable:
    """Flags of models A and B on the same points, counted: robust under both, A only, B only, neither."""

    both: int
    only_a: int
    only_b: int
    neither: int

    @classmethod
    def from_flags(cls, a: torch.Tensor, b: torch.Tensor) -> "PairedTable":
        a, b = a.bool(), b.bool()
        if a.shape != b.shape:
            raise ValueError(f"flags of {a.numel()} and {b.numel()} points cannot be paired")
        return cls(int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum()))

    @property
    def n(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def accuracy_a(self) -> float:
        return (self.both + self.only_a) / self.n

    @property
    def accuracy_b(self) -> float:
        return (self.both + self.only_b) / self.n

    @property
    def difference(self) -> float:
        """Accuracy of B minus accuracy of A."""
        return (self.only_b - self.only_a) / self.n

    def difference_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Newcombe's hybrid score interval (method 10) for :attr:`difference`.

        The Wilson intervals of both accuracies are combined with the estimated correlation of the
        two flags, which Newcombe shrinks towards 0 by ``n / 2`` when it is positive.
        """
        n = self.n
        p_a, p_b = self.accuracy_a, self.accuracy_b
        low_a, high_a = wilson(self.both + self.only_a, n, confidence)
        low_b, high_b = wilson(self.both + self.only_b, n, confidence)
        margins = ((self.both + self.only_a) * (self.only_b + self.neither) * (self.both + self.only_b)
                   * (self.only_a + self.neither))
        cross = self.both * self.neither - self.only_a * self.only_b
        if margins == 0 or 0 <= cross <= n / 2:
            phi = 0.0
        else:
            phi = (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)
        below = math.sqrt(max(0.0, (p_b - low_b) ** 2 - 2 * phi * (p_b - low_b) * (high_a - p_a)
                              + (high_a - p_a) ** 2))
        above = math.sqrt(max(0.0, (high_b - p_b) ** 2 - 2 * phi * (high_b - p_b) * (p_a - low_a)
                              + (p_a - low_a) ** 2))
        d = self.difference
        return max(-1.0, d - below), min(1.0, d + above)

    def mcnemar_p(self) -> float:
        """Exact McNemar p-value: are the points only A gets right as many as those only B gets right?"""
        return binomial_two_sided(self.only_a, self.only_a + self.only_b)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.difference_interval()
        return {"n": self.n, "both": self.both, "only_a": self.only_a, "only_b": self.only_b,
                "neither": self.neither, "accuracy_a": self.accuracy_a, "accuracy_b": self.accuracy_b,
                "difference": self.difference, "difference_ci95": [low, high], "mcnemar_p": self.mcnemar_p()}


# ------------------------------------------------------------------------------------ per class
def class_counts(labels: torch.Tensor, flags: torch.Tensor, classes: list[int]) -> list[int]:
    """Number of ``flags`` set among the points of each class in ``classes``."""
    return [int(flags[labels == c].sum()) for c in classes]


def per_class(result: "SuiteResult") -> dict[str, Any]:
    """Counts per class: points, clean-correct, and robust under every attack (and ``worst``) at each eps."""
    labels = result.labels
    classes = sorted(int(c) for c in labels.unique().tolist())
    sizes = class_counts(labels, torch.ones_like(labels, dtype=torch.bool), classes)
    robust = {eps_text(e, result.settings.norm): {name: class_counts(labels, result.robust(e, name), classes)
                           for name in result.attack_names + ["worst"]} for e in result.settings.eps}
    return {"classes": classes, "n": sizes, "clean": class_counts(labels, result.clean, classes), "robust": robust,
            "worst_class": {e: worst_class(classes, robust[e]["worst"], sizes) for e in robust}}


def worst_class(classes: list[int], counts: list[int], sizes: list[int]) -> dict[str, Any]:
    """The class with the lowest accuracy ``counts / sizes`` (the first one on ties), with its interval."""
    i = min(range(len(classes)), key=lambda j: (counts[j] / sizes[j], j))
    return {"class": classes[i], "n": sizes[i], "robust_count": counts[i], "accuracy": counts[i] / sizes[i],
            "ci95": list(wilson(counts[i], sizes[i]))}


def per_class_frame(counts: dict[str, Any]) -> pd.DataFrame:
    """One row per class: n, clean and worst-case robust accuracy (%) at each eps, with 95% bounds."""
    rows = []
    for i, c in enumerate(counts["classes"]):
        n = counts["n"][i]
        row: dict[str, Any] = {"class": c, "n": n}
        columns = [("clean", counts["clean"][i])] + [(f"worst@{e}", v["worst"][i]) for e, v in counts["robust"].items()]
        for name, k in columns:
            low, high = wilson(k, n)
            row.update({name: round(100 * k / n, 2), f"{name}_ci_low": round(100 * low, 2),
                        f"{name}_ci_high": round(100 * high, 2)})
        rows.append(row)
    return pd.DataFrame(rows).set_index("class")


def per_class_markdown(counts: dict[str, Any], heading: str = "## Per class") -> list[str]:
    """Report lines: per-class clean and worst-case accuracy with 95% intervals, then the worst class per eps.

    ``heading`` starts the title (``### L2: per class`` inside a further norm's section)."""
    eps_list = list(counts["robust"])
    lines = [f"{heading}: clean and worst-case robust accuracy (%)", "",
             "| class | n | Clean | " + " | ".join(f"Worst {e}" for e in eps_list) + " |",
             "|" + "---|" * (3 + len(eps_list))]
    for i, c in enumerate(counts["classes"]):
        n = counts["n"][i]
        cells = [ci_cell(counts["clean"][i], n)] + [ci_cell(counts["robust"][e]["worst"][i], n) for e in eps_list]
        lines.append(f"| {c} | {n} | " + " | ".join(cells) + " |")
    worst = [f"{e}: class {w['class']}, {ci_cell(w['robust_count'], w['n'])} of {w['n']} points"
             for e, w in counts["worst_class"].items()]
    return lines + ["", "Worst class (lowest worst-case accuracy): " + "; ".join(worst) + ".", ""]
