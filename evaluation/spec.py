"""The evaluation attacks: one table (:data:`ATTACKS`) from names to what runs.

Names: ``clean``, ``pgdK`` / ``cwK`` (any K), ``aa`` / ``aa-plus`` / ``aa-rand`` (AutoAttack
versions) and ``aa:apgd-ce,apgd-t,...`` (a custom AutoAttack list). Each entry of the table says
how its names parse, what runs (its own run function in :mod:`evaluation.runners`), whether it is
white-box, its family (sanity checks compare families), its column title, example names for
``--help`` and the line that states its rule in reports. The suite dispatches through the table; a
name no entry accepts is a ``UserError`` listing the forms, never a silent default. A new kind is
one ``register(EvalAttack(...))`` (docs/EXTENDING.md).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from core.registry import Registry
from errors import UserError

from . import runners

AA_COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
AA_VERSIONS = {"aa": "standard", "aa-plus": "plus", "aa-rand": "rand"}
AA_LABELS = {"standard": "AA", "plus": "AA+", "rand": "AA-rand"}
BLACK_BOX_COMPONENTS = ("square",)
PGD_STEP_FRACTION = 0.25  # step = eps / 4: the paper's 2/255 at 8/255, scaled to every eps
FAMILIES = ("clean", "iterative", "autoattack")
_ITERATIVE = re.compile(r"^(pgd|cw)(\d+)$")


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation attack as named on the command line: ``kind`` is a key of :data:`ATTACKS`."""

    name: str
    kind: str
    steps: int = 0
    version: str = ""  # AutoAttack version: standard | plus | rand | custom
    components: tuple[str, ...] = ()

    @property
    def entry(self) -> "EvalAttack":
        return ATTACKS[self.kind]

    @property
    def label(self) -> str:
        """Column title in the paper's style (``PGD-20``, ``CW-10``, ``AA``)."""
        return self.entry.label(self)

    @property
    def family(self) -> str:
        return self.entry.family

    @property
    def is_autoattack(self) -> bool:
        return self.family == "autoattack"

    @property
    def black_box_only(self) -> bool:
        """True for an AutoAttack list made of black-box attacks only (e.g. ``aa:square``)."""
        return self.is_autoattack and bool(self.components) and all(
            c in BLACK_BOX_COMPONENTS for c in self.components)

    @property
    def white_box(self) -> bool:
        return self.entry.white_box(self)


@dataclass(frozen=True)
class EvalAttack:
    """One kind of evaluation attack: how its names parse, what runs, how it reads in tables and reports."""

    kind: str
    forms: str  # the accepted names, for error messages and --help
    parse: Callable[[str, str], Optional[AttackSpec]]  # (lower-cased name, as typed) -> spec, or None
    label: Callable[[AttackSpec], str]
    family: str  # one of FAMILIES
    white_box: Callable[[AttackSpec], bool]
    run: Optional[runners.RunFn] = None  # None: nothing to run (clean)
    examples: tuple[str, ...] = ()  # names for --help, each accepted by ``parse``
    rule: str = ""  # how it runs, one report line; ``{step_fraction:g}``, ``{norm}``... from the settings

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"evaluation attack {self.kind}: family must be one of {FAMILIES}")
        if (self.run is None) != (self.family == "clean"):
            raise ValueError(f"evaluation attack {self.kind}: every kind but clean has a run function")
        bad = [name for name in self.examples if self.parse(name, name) is None]
        if bad:
            raise ValueError(f"evaluation attack {self.kind}: its parser refuses its example(s) {', '.join(bad)}")


def _parse_clean(text: str, name: str) -> Optional[AttackSpec]:
    return AttackSpec("clean", "clean") if text == "clean" else None


def _iterative_parser(kind: str) -> Callable[[str, str], Optional[AttackSpec]]:
    def parse(text: str, name: str) -> Optional[AttackSpec]:
        match = _ITERATIVE.match(text)
        if not match or match.group(1) != kind:
            return None
        steps = int(match.group(2))
        if steps < 1:
            raise UserError(f"attack {name!r} needs at least one step, e.g. {kind}10")
        return AttackSpec(f"{kind}{steps}", kind, steps=steps)
    return parse


def _parse_autoattack(text: str, name: str) -> Optional[AttackSpec]:
    if text in AA_VERSIONS:
        return AttackSpec(text, "aa", version=AA_VERSIONS[text])
    if not text.startswith("aa:"):
        return None
    parts = tuple(p.strip() for p in text[3:].split(",") if p.strip())
    bad = [p for p in parts if p not in AA_COMPONENTS]
    if not parts or bad:
        raise UserError(f"unknown AutoAttack component(s) {', '.join(bad) or '(none)'} in {name!r}; "
                        f"choose from: {', '.join(AA_COMPONENTS)}")
    parts = tuple(dict.fromkeys(parts))
    return AttackSpec("aa:" + ",".join(parts), "aa", version="custom", components=parts)


def _aa_label(spec: AttackSpec) -> str:
    return "AA(" + ",".join(spec.components) + ")" if spec.version == "custom" else AA_LABELS[spec.version]


ATTACKS: Registry[EvalAttack] = Registry("evaluation attack")


def register(entry: EvalAttack) -> EvalAttack:
    """Add an evaluation attack kind to :data:`ATTACKS` (a kind may be registered once)."""
    return ATTACKS.add(entry.kind, entry)


register(EvalAttack("clean", "clean", _parse_clean, lambda s: "Clean", "clean", lambda s: False,
                    examples=("clean",)))
register(EvalAttack("pgd", "pgdK (PGD-K on the CE loss, any K)", _iterative_parser("pgd"), lambda s: f"PGD-{s.steps}",
                    "iterative", lambda s: True, runners.run_pgd, examples=("pgd10", "pgd20"),
                    rule="PGD-K: K steps of size eps * {step_fraction:g} on the CE loss from a uniform random start "
                         "in the ball (drawn per point), 1 restart"))
register(EvalAttack("cw", "cwK (PGD-K on the CW margin, any K)", _iterative_parser("cw"), lambda s: f"CW-{s.steps}",
                    "iterative", lambda s: True, runners.run_cw, examples=("cw10", "cw20"),
                    rule="CW-K: PGD-K on the CW margin loss (kappa 0), same steps and starts as PGD-K"))
register(EvalAttack("aa", "aa, aa-plus, aa-rand, aa:apgd-ce,apgd-t,...", _parse_autoattack, _aa_label,
                    "autoattack", lambda s: not s.black_box_only, runners.run_autoattack,
                    examples=("aa", "aa-plus", "aa-rand", "aa:apgd-ce,apgd-t"),
                    rule="AA: AutoAttack (Croce and Hein 2020) with its own steps and restarts, on the points "
                         "still robust, per chunk of {chunk_size} points with a seed per chunk"))


def attack_examples() -> str:
    """Example names of every registered kind, for ``--help``."""
    return ", ".join(name for entry in ATTACKS.values() for name in entry.examples)


def parse_attack(name: str) -> AttackSpec:
    """Parse one attack name; a name no entry of :data:`ATTACKS` accepts raises ``UserError``."""
    text = name.strip().lower()
    for entry in ATTACKS.values():
        spec = entry.parse(text, name)
        if spec is not None:
            return spec
    raise UserError(f"unknown attack {name!r}; choose from: {'; '.join(e.forms for e in ATTACKS.values())}")


def parse_attacks(names: list[str]) -> list[AttackSpec]:
    """Parse and de-duplicate a list of names, keeping order; ``clean`` is implied and always first."""
    specs = {"clean": parse_attack("clean")}
    for name in names:
        spec = parse_attack(name)
        specs.setdefault(spec.name, spec)
    return list(specs.values())
