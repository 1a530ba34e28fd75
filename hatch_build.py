"""Wheel layout of this flat project (hatchling build hook; see pyproject.toml and docs/INSTALL.md).

The project's top-level packages (``core``, ``data``, ``models``, ...) and scripts go into
``site-packages/gkl_at_modules/`` instead of site-packages itself, and ``gkl_at_modules.pth`` appends
that folder to ``sys.path``: the names import as in the clone (``from losses import GKLLoss``), yet
the wheel writes no file that another distribution could also own, so installing or uninstalling it
can never overwrite or delete another package's ``data/`` or ``models/``. Editable installs are
left alone (the clone itself goes on the path).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

FOLDER = "gkl_at_modules"


class CustomBuildHook(BuildHookInterface):
    """Maps each entry of the hook's ``include`` list to ``gkl_at_modules/<entry>`` and adds the .pth."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        root = Path(self.root)
        entries = self.config.get("include", [])
        missing = [e for e in entries if not (root / e).exists()]
        if missing:
            raise FileNotFoundError(f"pyproject.toml lists {missing} for the wheel, but the clone has no such path")
        for entry in entries:
            build_data["force_include"][str(root / entry)] = f"{FOLDER}/{entry}"
        self._scratch = tempfile.TemporaryDirectory(prefix="gkl-at-wheel-")
        pth = Path(self._scratch.name) / f"{FOLDER}.pth"
        pth.write_text(f"{FOLDER}\n")  # a line of a .pth file is a folder relative to site-packages
        build_data["force_include"][str(pth)] = pth.name

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            scratch.cleanup()
