"""The argument parser of the command-line scripts (train_at.py, eval_autoattack.py, export_robustbench.py)."""
from __future__ import annotations

import argparse
import re

from errors import UserError

# argparse reads "-8/255" (and "-1e-3") as an unknown option, so "--eps -8/255" failed with "expected one
# argument" instead of the range error. None of the scripts has an option that starts with "-<digit>".
_NEGATIVE_VALUE = re.compile(r"^-\.?\d")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are ``UserError`` (one line, exit 2) rather than usage dumps, and
    which takes anything starting with ``-<digit>`` (``-8/255``, ``-0.5``, ``-1e-3``) as a value."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_VALUE  # argparse's own hook (CPython 3.10-3.14)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")
