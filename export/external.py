"""MALT beside AutoAttack as RobustBench's ``external`` evaluation in ``model_info``.

RobustBench ranks its L-inf / L2 boards by ``external`` where a model has one (a lower robust
accuracy found by another attack, e.g. Wang2023Better_WRN-28-10 on CIFAR-100: ``autoattack_acc``
38.83, ``external`` 38.77 "given by MALT (Melamed et al., 2024)" in the footnote). Here the
external figure is the worst case over standard AutoAttack and MALT on the same points (a point
is robust only if neither broke it), taken from an evaluation report's per-point flags, and only
when it is below AutoAttack's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from evaluation.report import EvalReport

CITATION = "MALT (Melamed et al., 2024)"


@dataclass(frozen=True)
class External:
    """The worst case over AutoAttack and MALT, and the points MALT added."""

    accuracy: float  # fraction of the n points robust under both
    attack: str  # the MALT variant (``malt``, ``malt:k=5``)
    autoattack_robust: int  # points AutoAttack left robust
    only_malt_broke: int  # of those, the points MALT broke
    only_autoattack_broke: int
    n: int

    def footnote(self) -> str:
        """The sentence RobustBench puts in ``footnote`` for an external evaluation."""
        return (f"{100 * self.accuracy:.2f}% robust accuracy is given by the worst case over AutoAttack and "
                f"{CITATION}{'' if self.attack == 'malt' else f' [{self.attack}]'}: MALT broke "
                f"{self.only_malt_broke} of the {self.autoattack_robust} points AutoAttack left robust.")


def external_from_report(part: "EvalReport", eps: float) -> Optional[External]:
    """The worst case over ``aa`` and the strongest MALT variant at ``eps`` when it is below AutoAttack's
    accuracy, else None (no MALT in the report, or MALT found nothing AutoAttack missed)."""
    row = part.find("aa", eps)
    flags = (part.raw.get("per_sample") or {}).get(row.eps_str if row else "", {})
    if row is None or "aa" not in flags:
        return None
    aa = _bits(flags["aa"])
    best: Optional[External] = None
    for name in (n for n in flags if n == "malt" or n.startswith("malt:")):
        malt = _bits(flags[name])
        if len(malt) != len(aa) or not aa:
            continue
        both = [a and m for a, m in zip(aa, malt)]
        found = External(sum(both) / len(aa), name, sum(aa), sum(a and not m for a, m in zip(aa, malt)),
                         sum(m and not a for a, m in zip(aa, malt)), len(aa))
        if found.only_malt_broke and (best is None or found.accuracy < best.accuracy):
            best = found
    return best


def _bits(text: str) -> list[bool]:
    return [c == "1" for c in str(text)]
