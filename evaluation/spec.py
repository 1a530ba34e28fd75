"""Names of the evaluation attacks (``clean``, ``pgd20``, ``cw10``, ``aa``, ``aa:apgd-ce,apgd-t`` ...).

A name parses into an :class:`AttackSpec`, which says what to run and how to label it in tables.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from errors import UserError

AA_COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AA_VERSIONS = {"aa": "standard", "aa-plus": "plus", "aa-rand": "rand"}
BLACK_BOX_COMPONENTS = ("square",)
PGD_STEP_FRACTION = 0.25  # step = eps / 4: the paper's 2/255 at 8/255, scaled to every eps
EXAMPLES = "clean, pgd10, pgd20, cw10, cw20, aa, aa-plus, aa-rand, aa:apgd-ce,apgd-t"
_ITERATIVE = re.compile(r"^(pgd|cw)(\d+)$")


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation attack: ``kind`` is clean | pgd | cw | aa."""

    name: str
    kind: str
    steps: int = 0
    version: str = ""  # AutoAttack version: standard | plus | rand | custom
    components: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """Column title in the paper's style (``PGD-20``, ``CW-10``, ``AA``)."""
        if self.kind == "clean":
            return "Clean"
        if self.kind in ("pgd", "cw"):
            return f"{self.kind.upper()}-{self.steps}"
        if self.version == "custom":
            return "AA(" + ",".join(self.components) + ")"
        return {"standard": "AA", "plus": "AA+", "rand": "AA-rand"}[self.version]

    @property
    def is_autoattack(self) -> bool:
        return self.kind == "aa"

    @property
    def black_box_only(self) -> bool:
        """True for an AutoAttack list made of black-box attacks only (e.g. ``aa:square``)."""
        return self.kind == "aa" and bool(self.components) and all(
            c in BLACK_BOX_COMPONENTS for c in self.components)

    @property
    def white_box(self) -> bool:
        return self.kind in ("pgd", "cw") or (self.kind == "aa" and not self.black_box_only)


def parse_attack(name: str) -> AttackSpec:
    """Parse one attack name; unknown names raise ``UserError`` listing the accepted forms."""
    text = name.strip().lower()
    if text == "clean":
        return AttackSpec("clean", "clean")
    match = _ITERATIVE.match(text)
    if match:
        steps = int(match.group(2))
        if steps < 1:
            raise UserError(f"attack {name!r} needs at least one step, e.g. {match.group(1)}10")
        return AttackSpec(f"{match.group(1)}{steps}", match.group(1), steps=steps)
    if text in AA_VERSIONS:
        return AttackSpec(text, "aa", version=AA_VERSIONS[text])
    if text.startswith("aa:"):
        parts = tuple(p.strip() for p in text[3:].split(",") if p.strip())
        bad = [p for p in parts if p not in AA_COMPONENTS]
        if not parts or bad:
            raise UserError(f"unknown AutoAttack component(s) {', '.join(bad) or '(none)'} in {name!r}; "
                            f"choose from: {', '.join(AA_COMPONENTS)}")
        parts = tuple(dict.fromkeys(parts))
        return AttackSpec("aa:" + ",".join(parts), "aa", version="custom", components=parts)
    raise UserError(f"unknown attack {name!r}; choose from: {EXAMPLES} (pgdN and cwN take any N)")


def parse_attacks(names: list[str]) -> list[AttackSpec]:
    """Parse and de-duplicate a list of names, keeping order; ``clean`` is implied and always first."""
    specs = {"clean": parse_attack("clean")}
    for name in names:
        spec = parse_attack(name)
        specs.setdefault(spec.name, spec)
    return list(specs.values())
