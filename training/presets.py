"""The YAML presets in ``configs/`` and YAML config files: mappings of config keys to values."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def list_presets() -> list[str]:
    """The preset names: the stems of ``configs/*.yaml``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The keys of ``configs/NAME.yaml``; an unknown name is a ``UserError`` listing the presets."""
    if name not in list_presets():
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return load_yaml(CONFIG_DIR / f"{name}.yaml")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of config keys; unreadable, malformed or non-mapping files are a ``UserError``."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"config {path} is not valid YAML{line}: fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path} holds a {type(data).__name__}, not a mapping of config keys to values")
    return data
