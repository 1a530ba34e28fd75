"""Sanity checks on a suite result: red flags for gradient masking or a broken evaluation.

Each check returns messages; the suite stores them as warnings in every report. None of them is
an error: a flagged number may still be right, but it should not be published unexamined.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from core.threat import eps_text

if TYPE_CHECKING:
    from .results import SuiteResult


def _pct(value: float) -> str:
    return f"{value:.2%}"


def monotone_in_eps(result: "SuiteResult") -> list[str]:
    """Robust accuracy must not rise with eps, per sample: robust at a larger eps => robust at smaller.

    Carrying flags across radii guarantees this; a violation means results were mixed up.
    """
    messages, norm = [], result.settings.norm
    for name in result.attack_names + ["worst"]:
        previous, prev_label = result.clean, "clean"
        for eps in result.settings.eps:
            flags = result.robust(eps, name)
            risen = int((flags & ~previous).sum())
            if risen:
                messages.append(f"{name}: {risen} point(s) robust at {eps_text(eps, norm)} but not at {prev_label}; "
                                "robust accuracy must not rise with eps")
            previous, prev_label = flags, eps_text(eps, norm)
    return messages


def autoattack_not_weaker(result: "SuiteResult") -> list[str]:
    """AutoAttack (white-box) and MALT accuracy must be <= every PGD/CW accuracy at the same eps."""
    specs = result.settings.attacks
    autoattacks = [a for a in specs if a.family == "autoattack" and a.white_box]
    iteratives = [a for a in specs if a.family == "iterative"]
    messages, norm = [], result.settings.norm
    for eps in result.settings.eps:
        for aa in autoattacks:
            for it in iteratives:
                acc_aa, acc_it = result.accuracy(eps, aa.name), result.accuracy(eps, it.name)
                if acc_aa > acc_it:
                    messages.append(f"{aa.label} {_pct(acc_aa)} is above {it.label} {_pct(acc_it)} at "
                                    f"{eps_text(eps, norm)}: {aa.label} should be the stronger attack (gradient "
                                    "masking, or a randomised model?)")
    return messages


def black_box_not_better(result: "SuiteResult") -> list[str]:
    """A black-box-only attack (e.g. ``aa:square``) must not beat every white-box attack."""
    specs = result.settings.attacks
    black = [a for a in specs if a.black_box_only]
    white = [a for a in specs if a.white_box]
    if not black or not white:
        return []
    messages, norm = [], result.settings.norm
    for eps in result.settings.eps:
        best_white = min(white, key=lambda a: result.accuracy(eps, a.name))
        acc_white = result.accuracy(eps, best_white.name)
        for bb in black:
            acc_bb = result.accuracy(eps, bb.name)
            if acc_bb < acc_white:
                messages.append(f"black-box {bb.label} {_pct(acc_bb)} beats the best white-box attack "
                                f"{best_white.label} {_pct(acc_white)} at {eps_text(eps, norm)}: gradients are "
                                "probably masked")
    return messages


def eps_zero_is_clean(result: "SuiteResult") -> list[str]:
    """At eps = 0 every attack must leave exactly the clean-correct points robust."""
    if 0.0 not in result.settings.eps:
        return []
    messages = []
    for name in result.attack_names:
        differ = int((result.robust(0.0, name) != result.clean).sum())
        if differ:
            messages.append(f"{name} at eps 0 changes {differ} prediction(s) relative to clean: the model "
                            "or the attack is not deterministic, or the attack leaves the eps-ball")
    return messages


CHECKS = (monotone_in_eps, autoattack_not_weaker, black_box_not_better, eps_zero_is_clean)


def sanity_checks(result: "SuiteResult") -> list[str]:
    """All checks' messages, in a fixed order."""
    return [message for check in CHECKS for message in check(result)]
