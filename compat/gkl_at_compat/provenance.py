"""Which AutoAttack ``import autoattack`` gives in this environment, read from installation metadata.

Only the standard library, and nothing is imported: the answer comes from ``importlib``'s finders,
the distributions' metadata (``direct_url.json`` tells a git or local install from an index one) and,
for a git clone on the path, the clone's ``.git`` folder.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Optional

GIT_PACKAGE = "autoattack"  # fra31/auto-attack, installed from its repository
PYPI_PACKAGE = "pyautoattack"  # the same authors' package on PyPI


def implementation(alias: bool) -> dict[str, Optional[str]]:
    """``package``, ``version``, ``source`` (``pypi``: from a package index; ``git``; ``local``: a folder
    or file; ``path``: a folder on sys.path with no installation metadata), ``commit`` (git only), ``url``,
    ``module_file`` and ``summary`` (one line) of the AutoAttack behind ``import autoattack``.

    ``alias``: whether ``autoattack`` is gkl_at_compat's alias over pyautoattack.
    """
    name = PYPI_PACKAGE if alias else GIT_PACKAGE
    spec = importlib.util.find_spec(name)
    if spec is None:
        return {"package": None, "version": None, "source": None, "commit": None, "url": None,
                "module_file": None, "summary": "no AutoAttack installed (pip install pyautoattack)"}
    info = {"package": name, "version": None, "source": "path", "commit": None, "url": None,
            "module_file": spec.origin}
    dist = _distribution_of(name, spec.origin)
    if dist is not None:
        info["package"], info["version"] = dist.metadata["Name"], dist.version
        info.update(_install_source(dist))
    else:
        info["commit"] = _git_head(Path(spec.origin or ".").parent)
        if info["commit"] is not None:
            info["source"] = "git"
    info["summary"] = _summary(info, alias)
    return info


def _distribution_of(module: str, origin: Optional[str]) -> Optional[importlib.metadata.Distribution]:
    """The installed distribution whose files hold ``origin`` (a module's ``__init__.py``), if any."""
    for dist_name in importlib.metadata.packages_distributions().get(module, []):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        files = {str(f.locate().resolve()) for f in dist.files or [] if f.name == Path(origin or "").name}
        if origin is None or str(Path(origin).resolve()) in files or not dist.files:
            return dist
    return None


def _install_source(dist: importlib.metadata.Distribution) -> dict[str, Optional[str]]:
    """Where pip took the distribution from (PEP 610's ``direct_url.json``; none: a package index)."""
    text = dist.read_text("direct_url.json")
    if not text:
        return {"source": "pypi"}
    try:
        direct = json.loads(text)
    except ValueError:
        return {"source": "unknown"}
    vcs = direct.get("vcs_info")
    if vcs:
        return {"source": vcs.get("vcs", "vcs"), "commit": vcs.get("commit_id"), "url": direct.get("url")}
    return {"source": "local", "url": direct.get("url")}


def _git_head(folder: Path) -> Optional[str]:
    """The commit checked out in the git clone holding ``folder`` (read from ``.git``; no git needed)."""
    for parent in [folder, *folder.parents]:
        git = parent / ".git"
        if git.is_dir():
            try:
                head = (git / "HEAD").read_text().strip()
                if not head.startswith("ref: "):
                    return head
                ref = head[5:]
                if (git / ref).is_file():
                    return (git / ref).read_text().strip()
                packed = (git / "packed-refs").read_text() if (git / "packed-refs").is_file() else ""
                return next((line.split()[0] for line in packed.splitlines() if line.endswith(" " + ref)), None)
            except OSError:
                return None
    return None


def _summary(info: dict[str, Optional[str]], alias: bool) -> str:
    """``pyautoattack 0.2.0 (PyPI) through ...``, ``autoattack 0.1 (git https://...@0123abcd4567)``."""
    source = info["source"]
    where = {"pypi": "PyPI", "path": f"no installation metadata, {info['module_file']}"}.get(str(source), str(source))
    if source not in ("pypi", "path") and (info["url"] or info["module_file"]):
        where += f" {info['url'] or info['module_file']}"
    if info["commit"]:
        where += f"@{info['commit'][:12]}"
    version = f" {info['version']}" if info["version"] else ""
    text = f"{info['package']}{version} ({where})"
    return f"{text} through gkl_at_compat's autoattack alias" if alias else text
