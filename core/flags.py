"""Command-line flags made from a config dataclass, and the bounds of counts.

Every field becomes ``--field-name`` (or a positional argument), typed by its annotation: ``int``,
``float``, ``str``, ``bool`` (a switch), ``list[X]`` (one or more values), each possibly
``Optional``. A field's ``metadata`` may hold ``help`` (one line) and ``choices`` (a tuple), each
also as a function returning it (read when the parser is built, so registries can still grow),
``metavar`` and ``positional``. Flags default to "not given" (absent from the parsed namespace), so
that :func:`given_values` tells a value typed on the command line from a default or a saved value
(a resume reads those back).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Union, get_args, get_origin, get_type_hints

from errors import UserError

SEED_LIMIT = 2**32 - 1  # numpy's and most seeding APIs' range; torch's too, with room for + rank
STEPS_LIMIT = 10_000  # attack steps: 10x the longest attacks of the field's evaluations


def check_count(flag: str, value: int, limit: int) -> None:
    """Refuse a count above ``limit`` with one line naming the bound (a typo must not run for ever)."""
    if value > limit:
        raise UserError(f"{flag} {value} is above the limit of {limit:,}: pass a smaller number")


def flag_name(field: str) -> str:
    """``--batch-size`` for ``batch_size``."""
    return "--" + field.replace("_", "-")


def _unwrap(tp: Any) -> Any:
    """``X`` for ``Optional[X]``."""
    if get_origin(tp) is Union:
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of the dataclass ``cls`` (see the module docstring)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, tp = f.metadata, _unwrap(hints[f.name])
        text = meta.get("help", "")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text() if callable(text) else text}
        if tp is bool:
            kwargs["action"] = "store_true"
        else:
            if get_origin(tp) is list:
                tp, kwargs["nargs"] = get_args(tp)[0], "+"
            kwargs["type"] = tp
            choices = meta.get("choices")
            if choices is not None:
                kwargs["choices"] = choices() if callable(choices) else choices
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
        if meta.get("positional"):
            parser.add_argument(f.name, nargs="?", **kwargs)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, **kwargs)


def given_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that the command line gave (see :func:`add_dataclass_flags`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}
