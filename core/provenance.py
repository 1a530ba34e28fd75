"""Where a result came from: timestamps, library versions and the code version."""
from __future__ import annotations

import datetime as dt
import functools
import importlib.metadata
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional


def now_iso() -> str:
    """The local time with its UTC offset, to the second (``2026-12-01T10:13:34+00:00``)."""
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def package_versions(names: Iterable[str]) -> dict[str, Optional[str]]:
    """Installed version of each distribution (its ``__version__`` when it has no metadata, else None)."""
    found: dict[str, Optional[str]] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # e.g. a copied package without its dist-info
            found[name] = getattr(sys.modules.get(name), "__version__", None)
    return found


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe`` of the code this process imported (asked once: it runs a subprocess)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
