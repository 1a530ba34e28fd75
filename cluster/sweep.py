"""Sweeps: a grid of config values x seeds, one run folder each, its manifest ``SWEEP/sweep.yaml``.

``SWEEP/<k1>=<v1>,<k2>=<v2>/seed<S>`` is a normal ``train_at.py`` run folder (a ``/`` in a value is
written ``over`` in the folder name, as in ``eps=8over255``) whose evaluation goes to
``.../eval``. The manifest (format ``gkl-at-sweep/1``) lists the common arguments, the grid with
its values as typed, the seeds and every run in submission order; ``python -m evaluation.compare
SWEEP`` reads it. A sweep submitted again into the same folder keeps its arguments and keys,
may add values and seeds (the manifest keeps the union), and :func:`plan` then skips what is
finished, resumes what is not, and submits only what is new.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from core.files import atomic_write_text
from errors import UserError

from .commands import config_key, key_flag, parse_train, train_parser

FORMAT = "gkl-at-sweep/1"
MANIFEST = "sweep.yaml"
_NOT_IN_TRAIN_ARGS = ("out", "resume", "overwrite")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["alpha=10,20", "beta=3,4"]`` -> ``{"alpha": ["10", "20"], "beta": ["3", "4"]}`` (config keys, in order)."""
    if not items:
        raise UserError("a sweep needs at least one --grid KEY=V1,V2,... (e.g. --grid alpha=10,20)")
    grid: dict[str, list[str]] = {}
    for item in items:
        name, eq, text = item.partition("=")
        values = [v.strip() for v in text.split(",")]
        if not eq or not name.strip() or not all(values):
            raise UserError(f"--grid {item!r}: write KEY=V1,V2,... with no empty value (e.g. --grid alpha=10,20)")
        if any(c.isspace() or c in "=[]" for v in values for c in v):
            raise UserError(f"--grid {item!r}: a value may not hold spaces, '=' or brackets (it names a folder)")
        key = config_key(name)
        if key == "seed":
            raise UserError("--grid seed: give the seeds with --seeds S1 S2 ... (every grid point runs each seed)")
        if key in grid:
            raise UserError(f"--grid {name}: the key {key} is given twice; list all its values in one --grid")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {item!r}: a value is repeated")
        grid[key] = values
    return grid


def run_dir_name(point: dict[str, str], seed: int) -> str:
    """``alpha=10,beta=3/seed0``: the run folder of a grid point and seed, relative to the sweep folder."""
    return ",".join(f"{k}={v.replace('/', 'over')}" for k, v in point.items()) + f"/seed{seed}"


@dataclass
class Sweep:
    """The manifest of a sweep (see the module docstring)."""

    train_args: list[str]
    eval_args: list[str]
    grid: dict[str, list[str]]
    seeds: list[int]
    runs: list[dict] = field(default_factory=list)

    def points(self) -> list[dict[str, str]]:
        return [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())]

    def fill_runs(self) -> None:
        """Add the runs of every grid point and seed not yet listed (the earlier ones keep their place)."""
        known = {r["dir"] for r in self.runs}
        for point in self.points():
            for seed in self.seeds:
                name = run_dir_name(point, seed)
                if name not in known:
                    self.runs.append({"dir": name, "point": dict(point), "seed": seed})
                    known.add(name)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "train_args": list(self.train_args), "eval_args": list(self.eval_args),
                "grid": {k: list(v) for k, v in self.grid.items()}, "seeds": list(self.seeds), "runs": self.runs}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / MANIFEST, yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))

    def run_argv(self, run: dict, folder: Path) -> list[str]:
        """The ``train_at.py`` arguments of one run."""
        point = [a for k, v in run["point"].items() for a in (key_flag(k), v)]
        return [*self.train_args, *point, "--seed", str(run["seed"]), "--out", str(folder / run["dir"])]

    def eval_argv(self, run: dict, folder: Path) -> list[str]:
        """The ``eval_autoattack.py`` arguments of one run (its evaluation goes to RUN/eval)."""
        run_dir = folder / run["dir"]
        return [str(run_dir), *self.eval_args, "--out", str(run_dir / "eval")]


def load(folder: Path) -> Optional[Sweep]:
    """The sweep already in ``folder`` (None when there is none)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        d = yaml.safe_load(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}")
        return Sweep(list(d["train_args"]), list(d["eval_args"]), {k: list(map(str, v)) for k, v in d["grid"].items()},
                     [int(s) for s in d["seeds"]], list(d["runs"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
        raise UserError(f"{path} is not a sweep manifest this version reads ({e}): choose another --out") from None


def check_train_args(train_args: list[str], grid: dict[str, list[str]]) -> None:
    """The common training arguments may not set what the sweep sets per run (a key under an old or a new
    name counts as the same key)."""
    from training.methods import key_for_old_name

    args = train_parser().parse_args(train_args)
    for name in _NOT_IN_TRAIN_ARGS:
        if getattr(args, name):
            raise UserError(f"--{name} in the training arguments: a sweep names its run folders itself (--out SWEEP "
                            "on submit.py; submitting again resumes what is unfinished)")
    if getattr(args, "cfg_seed", None) is not None:
        raise UserError("--seed in the training arguments: give the seeds with --seeds S1 S2 ...")
    loss = getattr(args, "cfg_loss", None) or parse_train(train_args + ["--out", "unused"])[1].loss
    given = {key_for_old_name(k[4:], loss) or k[4:]: k[4:] for k, v in vars(args).items()
             if k.startswith("cfg_") and v is not None}
    for key in grid:
        same = given.get(key_for_old_name(key, loss) or key)
        if same is not None:
            raise UserError(f"{key_flag(same)} in the training arguments sets what --grid {key} sweeps: keep one")


def merge(folder: Path, new: Sweep) -> Sweep:
    """``new`` on top of the sweep already in ``folder``: same arguments and keys; values and seeds are united."""
    old = load(folder)
    if old is None:
        new.fill_runs()
        return new
    if old.train_args != new.train_args or old.eval_args != new.eval_args:
        raise UserError(f"{folder / MANIFEST} was made with other arguments (training: {' '.join(old.train_args)}; "
                        f"evaluation: {' '.join(old.eval_args) or 'none'}): repeat them exactly, or use another --out")
    if list(old.grid) != list(new.grid):
        raise UserError(f"{folder / MANIFEST} sweeps {', '.join(old.grid)}, not {', '.join(new.grid)}: give the same "
                        "--grid keys in the same order (values may be added), or use another --out")
    grid = {k: old.grid[k] + [v for v in new.grid[k] if v not in old.grid[k]] for k in old.grid}
    seeds = old.seeds + [s for s in new.seeds if s not in old.seeds]
    merged = Sweep(old.train_args, old.eval_args, grid, seeds, list(old.runs))
    merged.fill_runs()
    return merged


def default_seeds(train_args: list[str]) -> list[int]:
    """The seed the training arguments resolve to (the preset's), when ``--seeds`` is not given."""
    _, cfg, _, _ = parse_train(train_args + ["--out", "unused"])
    return [int(cfg.seed)]
