"""Reports of a suite run: JSON (every number and setting), CSV and Markdown tables, a PNG plot.

Table layouts follow the paper: Table 14 (one row per attack, one column per eps, plus Clean
and Avg.) and Table 15 (one row per eps, one column per attack, plus Clean and Worst). Numbers
in tables are percentages with two decimals; the JSON keeps exact counts and fractions. Every
accuracy in report.md and report.json carries its 95% Wilson interval (:mod:`evaluation.stats`),
and both list per-class clean and worst-case robust accuracy with the worst class.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import pandas as pd
import torch

from core.files import atomic_write
from core.provenance import now_iso, package_versions
from core.threat import eps_text
from errors import UserError

from .composite import composite_markdown, composite_rows
from .results import SuiteResult, SuiteSettings
from .spec import ATTACKS
from .stats import ci_cell, per_class, per_class_frame, per_class_markdown, wilson

REPORT_FILES = {"json": "report.json", "markdown": "report.md", "table_eps": "table_eps.csv",
                "table_attacks": "table_attacks.csv", "per_sample": "per_sample.csv",
                "per_class": "per_class.csv", "plot": "robust_vs_eps.png"}
_PACKAGES = ("torch", "torchvision", "numpy", "pyautoattack", "robustbench", "pandas")


def _with_worst(result: SuiteResult) -> list[str]:
    """The attacks run and their worst case; nothing when no eps attack ran (the worst case is undefined)."""
    return result.attack_names + ["worst"] if result.attack_names else []


def _labels(result: SuiteResult) -> dict[str, str]:
    return {a.name: a.label for a in result.settings.attacks}


def _pct(value: float) -> float:
    return round(100.0 * value, 2)


def _cell(result: SuiteResult, eps: float, name: str, ci: bool) -> Any:
    """The accuracy in %, or with ``ci`` the text ``"45.00 [39.12, 51.03]"`` with its 95% Wilson interval."""
    if not ci:
        return _pct(result.accuracy(eps, name))
    return ci_cell(int(result.robust(eps, name).sum()), result.n)


def table_eps(result: SuiteResult, ci: bool = False) -> pd.DataFrame:
    """Table 14 layout: rows = attacks and Worst; columns = Clean, each eps (x/255), Avg. (``ci``: text cells)."""
    labels, norm = _labels(result), result.settings.norm
    rows = {}
    for name in _with_worst(result):
        values = [_pct(result.accuracy(e, name)) for e in result.settings.eps]
        row = {"Clean": _cell(result, result.settings.eps[0], "clean", ci)}
        row.update({eps_text(e, norm): _cell(result, e, name, ci) for e in result.settings.eps})
        row["Avg."] = round(sum(values) / len(values), 2)
        rows[labels.get(name, "Worst")] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "Attack"
    return frame


def table_attacks(result: SuiteResult, ci: bool = False) -> pd.DataFrame:
    """Table 15 layout: rows = eps (x/255); columns = Clean, each attack, Worst (``ci``: text cells)."""
    labels, norm = _labels(result), result.settings.norm
    rows = {}
    for eps in result.settings.eps:
        row = {"Clean": _cell(result, eps, "clean", ci)}
        row.update({labels[n]: _cell(result, eps, n, ci) for n in result.attack_names})
        if result.attack_names:
            row["Worst"] = _cell(result, eps, "worst", ci)
        rows[eps_text(eps, norm)] = row
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "eps"
    return frame


def per_sample_frame(result: SuiteResult) -> pd.DataFrame:
    """One row per evaluated point: label, clean flag, and ``attack@eps`` robust flags (0/1)."""
    columns: dict[str, Any] = {"label": result.labels.tolist(), "clean": result.clean.int().tolist()}
    norm = result.settings.norm
    for eps in result.settings.eps:
        for name in _with_worst(result):
            columns[f"{name}@{eps_text(eps, norm)}"] = result.robust(eps, name).int().tolist()
    frame = pd.DataFrame(columns)
    frame.index.name = "index"
    return frame


def environment_info(device: Optional[torch.device] = None) -> dict[str, Any]:
    """Library versions, Python, platform and accelerator: what a reader needs to reproduce.

    ``autoattack`` names the AutoAttack implementation the ``aa`` attacks run here (package, version,
    ``pypi`` or ``git`` with its commit; see ``attacks.rb_bridge.autoattack_implementation``).
    """
    from attacks.rb_bridge import autoattack_implementation

    versions = package_versions(_PACKAGES)
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "autoattack": autoattack_implementation(), "device": str(device) if device is not None else None}
    if device is not None and device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def report_dict(result: SuiteResult, meta: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Everything as JSON-ready data: settings, per-(eps, attack) numbers, flags, warnings."""
    labels, norm = _labels(result), result.settings.norm
    rows = []
    for eps in result.settings.eps:
        for name in _with_worst(result):
            flags = result.robust(eps, name)
            res = result.results.get((eps, name))
            rows.append({"eps": eps, "eps_str": eps_text(eps, norm), "attack": name,
                         "label": labels.get(name, "Worst"),
                         "robust_accuracy": flags.float().mean().item(), "robust_count": int(flags.sum()),
                         "ci95": list(wilson(int(flags.sum()), result.n)),
                         "n": result.n, "attacked": res.attacked if res else None,
                         "seconds": round(res.seconds, 3) if res else None, "seed": res.seed if res else None,
                         "resumed": res.cached if res else None})
    per_sample = {"clean": _bits(result.clean)}
    for eps in result.settings.eps:
        per_sample[eps_text(eps, norm)] = {n: _bits(result.robust(eps, n))
                                           for n in _with_worst(result)}
    composite = composite_rows(result)
    return {"created": now_iso(),
            "settings": result.settings.as_dict(), **(meta or {}),
            "n": result.n, "clean_accuracy": result.clean.float().mean().item(),
            "clean_count": int(result.clean.sum()), "clean_ci95": list(wilson(int(result.clean.sum()), result.n)),
            "intervals": "ci95: 95% Wilson score interval of the accuracy over the n points",
            "results": rows, "per_class": per_class(result), "warnings": list(result.warnings),
            **({"autoattack_and_malt": composite} if composite else {}),
            "per_sample_note": "strings of 0/1 per evaluated point, in data order", "per_sample": per_sample}


def _bits(flags: torch.Tensor) -> str:
    return "".join("1" if f else "0" for f in flags.tolist())


def _markdown_table(frame: pd.DataFrame) -> str:
    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for index, row in frame.iterrows():
        cells = [v if isinstance(v, str) else f"{v:.2f}" for v in row.tolist()]
        lines.append("| " + " | ".join([str(index)] + cells) + " |")
    return "\n".join(lines)


def rule_lines(settings: SuiteSettings) -> list[str]:
    """How each kind of attack in ``settings`` ran: the ``rule`` of its entry in the attack table, once per kind."""
    kinds = dict.fromkeys(a.kind for a in settings.attacks)
    values = settings.as_dict()
    return [ATTACKS[k].rule.format(**values) for k in ATTACKS if k in kinds and ATTACKS[k].rule]


def markdown_report(result: SuiteResult, meta: Optional[dict[str, Any]] = None) -> str:
    """Human-readable report: settings, both tables, sanity-check warnings, timings."""
    meta = meta or {}
    s = result.settings
    model = meta.get("model", {})
    lines = [f"# Robustness evaluation: {model.get('source', 'model')}", ""]
    lines += [f"- model: {model.get('arch')} ({model.get('kind')}), weights {model.get('weights')}, "
              f"epoch {model.get('epoch')}, file {model.get('path')}",
              f"- data: {meta.get('data', {}).get('description', f'{result.n} points')}",
              f"- threat model: {s.norm}, eps {', '.join(eps_text(e, s.norm) for e in s.eps)}; seed {s.seed}; fp32",
              *[f"- {line}" for line in rule_lines(s)],
              "- multi-eps: at each eps an attack runs only on the points it could not break at the "
              "previous eps",
              f"- [low, high]: 95% Wilson interval over the {result.n} points (Avg.: mean over eps, no interval)", ""]
    if result.attack_names:
        lines += ["## Robust accuracy (%) across eps (Table 14 layout)", "",
                  _markdown_table(table_eps(result, ci=True)), ""]
        lines += ["## Robust accuracy (%) per attack (Table 15 layout)", "",
                  _markdown_table(table_attacks(result, ci=True)), ""]
        lines += composite_markdown(result)
        lines += per_class_markdown(per_class(result))
    else:
        lines += [f"No eps attack ran: clean accuracy {ci_cell(int(result.clean.sum()), result.n)} % over "
                  f"{result.n} points.", ""]
    lines += ["## Sanity checks", ""]
    lines += [f"- WARNING: {w}" for w in result.warnings] or ["- all passed"]
    seconds = sum(r.seconds for r in result.results.values() if not r.cached)
    lines += ["", f"Attack time: {seconds:.1f} s. Versions: " + ", ".join(
        f"{k} {v}" for k, v in meta.get("environment", {}).get("packages", {}).items() if v), ""]
    implementation = (meta.get("environment", {}).get("autoattack") or {}).get("summary")
    if implementation and any(a.is_autoattack for a in result.settings.attacks):
        lines += [f"AutoAttack: {implementation}.", ""]
    return "\n".join(lines)


def plot_robustness(result: SuiteResult, path: str | os.PathLike) -> None:
    """PNG of robust accuracy vs eps, one line per attack plus Worst; clean as a dotted line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    norm = result.settings.norm
    xs = [e * (255 if norm == "Linf" else 1) for e in result.settings.eps]
    labels = _labels(result)
    for name in _with_worst(result):
        ys = [100 * result.accuracy(e, name) for e in result.settings.eps]
        style = dict(linestyle="--", color="black") if name == "worst" else {}
        ax.plot(xs, ys, marker="o", label=labels.get(name, "Worst"), **style)
        if name == "worst":
            bounds = [wilson(int(result.robust(e, name).sum()), result.n) for e in result.settings.eps]
            ax.fill_between(xs, [100 * low for low, _ in bounds], [100 * high for _, high in bounds], color="black",
                            alpha=0.12, linewidth=0, label="Worst, 95% interval")
    ax.axhline(100 * result.clean.float().mean().item(), linestyle=":", color="gray", label="Clean")
    ax.set_xlabel(f"eps ({norm}, x/255)" if norm == "Linf" else f"eps ({norm})")
    ax.set_ylabel("robust accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


class ReportSection(Protocol):
    """A further part of one report (another norm, common corruptions): its JSON goes under
    ``sections[key]`` of report.json, its Markdown after the main tables, its files beside them."""

    key: str

    def to_dict(self) -> dict[str, Any]: ...

    def markdown(self) -> str: ...

    def write_files(self, out: Path) -> dict[str, Path]: ...


def write_reports(result: SuiteResult, out_dir: str | os.PathLike,
                  meta: Optional[dict[str, Any]] = None, sections: Sequence[ReportSection] = ()) -> dict[str, Path]:
    """Write every report file into ``out_dir`` (each atomically); returns kind -> path.

    ``result`` is the main threat model (top-level fields of report.json); ``sections`` add more.
    """
    out = Path(out_dir)
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}
    data = report_dict(result, meta)
    if sections:
        data["sections"] = {s.key: s.to_dict() for s in sections}
    text = "\n".join([markdown_report(result, meta), *(s.markdown() for s in sections)])
    atomic_write(paths["json"], lambda f: json.dump(data, f, indent=1, default=str), binary=False)
    atomic_write(paths["markdown"], lambda f: f.write(text), binary=False)
    atomic_write(paths["table_eps"], lambda f: table_eps(result).to_csv(f), binary=False)
    atomic_write(paths["table_attacks"], lambda f: table_attacks(result).to_csv(f), binary=False)
    atomic_write(paths["per_sample"], lambda f: per_sample_frame(result).to_csv(f), binary=False)
    atomic_write(paths["per_class"], lambda f: per_class_frame(data["per_class"]).to_csv(f), binary=False)
    plot_robustness(result, paths["plot"])
    for section in sections:
        paths.update(section.write_files(out))
    return paths


# ------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ReportRow:
    """One (eps, attack) figure of a report (``attack`` may be ``worst``)."""

    eps: float
    eps_str: str
    attack: str
    label: str
    robust_accuracy: float
    n: Optional[int]


@dataclass(frozen=True)
class CorruptionsReport:
    """The common-corruptions section of a report: accuracy per (corruption, severity) and the mean."""

    dataset: Optional[str]
    mean_accuracy: float
    n_per_severity: int
    robustbench_figure: bool  # all 15 corruptions x 5 severities on 10,000 images each
    accuracies: dict[tuple[str, int], float]

    @property
    def corruptions(self) -> list[str]:
        return list(dict.fromkeys(c for c, _ in self.accuracies))

    @property
    def severities(self) -> list[int]:
        return sorted({s for _, s in self.accuracies})


@dataclass
class EvalReport:
    """A ``report.json`` written by :func:`write_reports`, read back (the one reader of that file).

    The top level is the main threat model; ``sections`` holds further norms (each an
    ``EvalReport`` of its own) and ``corruptions`` the common-corruptions section, if evaluated.
    """

    path: Path
    clean_accuracy: float
    n: Optional[int]
    norm: Optional[str]
    dataset: Optional[str]
    split: Optional[str]
    model: dict[str, Any]
    rows: list[ReportRow]
    raw: dict[str, Any]
    sections: dict[str, "EvalReport"] = field(default_factory=dict)
    corruptions: Optional[CorruptionsReport] = None

    def find(self, attack: str, eps: float, tol: float = 1e-6) -> Optional[ReportRow]:
        """The row of ``attack`` at ``eps`` (up to ``tol``), or None."""
        return next((r for r in self.rows if r.attack == attack and abs(r.eps - eps) < tol), None)

    @property
    def norms(self) -> list[str]:
        """The threat models with eps results, the main one first."""
        return [n for n in [self.norm, *self.sections] if n]

    def threat(self, norm: str) -> Optional["EvalReport"]:
        """The part of the report for ``norm`` (the report itself or a section), or None."""
        return self if self.norm == norm else self.sections.get(norm)


def report_path(source: str | os.PathLike) -> Path:
    """``source`` itself when it is a ``.json`` file, else the report of the run folder ``source``."""
    path = Path(source)
    return path if path.suffix == ".json" else path / "eval" / REPORT_FILES["json"]


def read_report(path: str | os.PathLike, *, missing_hint: str = "run eval_autoattack.py first") -> EvalReport:
    """Read and check a report; a missing, unreadable or foreign file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no evaluation report at {path}: {missing_hint}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read evaluation report {path}: {str(e).splitlines()[0][:200]} "
                        "(rerun eval_autoattack.py)") from None
    if not isinstance(raw, dict) or "results" not in raw or "clean_accuracy" not in raw:
        raise UserError(f"{path} is not a report.json written by eval_autoattack.py (no results/clean_accuracy)")
    report = _suite_part(path, raw, raw)
    sections = raw.get("sections") or {}
    if not isinstance(sections, dict):
        raise UserError(f"{path} has malformed sections: rerun eval_autoattack.py")
    for key, part in sections.items():
        if key == "corruptions":
            report.corruptions = _corruptions_part(path, part)
        elif isinstance(part, dict) and "results" in part and "clean_accuracy" in part:
            report.sections[key] = _suite_part(path, part, raw)
    return report


def _suite_part(path: Path, part: dict[str, Any], top: dict[str, Any]) -> EvalReport:
    """One threat model's figures; data and model come from the top level (one model, one data set)."""
    settings, data = part.get("settings") or {}, top.get("data") or {}
    try:
        rows = [ReportRow(float(r.get("eps", "nan")), str(r.get("eps_str", "")), str(r.get("attack", "")),
                          str(r.get("label", "")), float(r["robust_accuracy"]), r.get("n")) for r in part["results"]]
        clean = float(part["clean_accuracy"])
    except (AttributeError, KeyError, TypeError, ValueError):
        raise UserError(f"{path} has malformed results rows: rerun eval_autoattack.py") from None
    return EvalReport(path, clean, part.get("n"), settings.get("norm"), data.get("dataset"),
                      data.get("split"), dict(top.get("model") or {}), rows, part)


def _corruptions_part(path: Path, part: Any) -> CorruptionsReport:
    try:
        accuracies = {(str(r["corruption"]), int(r["severity"])): float(r["accuracy"]) for r in part["results"]}
        return CorruptionsReport(part.get("dataset"), float(part["mean_accuracy"]), int(part["n_per_severity"]),
                                 bool(part.get("robustbench_figure")), accuracies)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise UserError(f"{path} has a malformed corruptions section: rerun eval_autoattack.py") from None
