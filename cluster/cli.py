"""``submit.py``: train_at.py and eval_autoattack.py as Slurm (or local) jobs that requeue to completion; sweeps.

    python submit.py train [cluster options] -- <train_at.py arguments>
    python submit.py eval  [cluster options] -- <eval_autoattack.py arguments>
    python submit.py sweep --grid KEY=V1,V2,... [--grid ...] [--seeds S ...] --out SWEEP
                           [--eval-args "<eval_autoattack.py arguments>"] [cluster options] -- <train_at.py arguments>

A job runs the same command as a local one. Shortly before its time limit Slurm warns it
(``--signal-delay``); it saves at a step boundary (training) or keeps its finished chunks
(evaluation), requeues itself and resumes exactly, up to ``--max-requeues`` times. A pre-empted
job saves the same way and Slurm requeues it. Each allocation is a row of RUN/allocations.csv;
the submitted jobs are rows of RUN/jobs.csv (SWEEP/jobs.csv). Submitting a sweep again skips
finished runs, resumes unfinished ones and adds new grid values and seeds.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

from core.cli import ArgumentParser
from errors import UserError

from .commands import Planned, eval_job, train_job
from .options import add_cluster_options, check_cluster_options
from .planning import active_job, plan_sweep
from .submission import Submitter, refresh_states
from .sweep import Sweep, check_train_args, default_seeds, merge, parse_grid

EXIT_CODES = """\
exit codes:
  0  submitted (with --wait: every job finished), or nothing to do
  1  with --wait: a job failed, was cancelled or ran out of requeues
  2  bad arguments, cluster options or command (one line on stderr; nothing submitted)
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="submit.py", description=__doc__, epilog=EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,eval,sweep}")
    for name, what in (("train", "train_at.py"), ("eval", "eval_autoattack.py"), ("sweep", "train_at.py")):
        s = sub.add_parser(name, help=f"run {what} as a job" if name != "sweep" else "a grid x seeds of runs",
                           usage=f"submit.py {name} [options] -- <{what} arguments>", epilog=EXIT_CODES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "sweep":
            s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                           help="a config key and its values (repeatable; every combination is a grid point)")
            s.add_argument("--seeds", nargs="+", type=int, default=None, metavar="S",
                           help="seeds of every grid point (default: the config's seed)")
            s.add_argument("--out", required=True, metavar="SWEEP", help="the sweep folder (one run folder per "
                                                                          "grid point and seed inside)")
            s.add_argument("--eval-args", default=None, metavar='"ARGS"',
                           help="eval_autoattack.py arguments: each run is evaluated after its training succeeded "
                                "(default: no evaluation)")
        add_cluster_options(s)
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """``submit.py``'s own arguments and the command's (after ``--``)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def _submit_one(opts: argparse.Namespace, planned: Planned) -> int:
    rows = [r for r in refresh_states(planned.run_dir / "jobs.csv") if r["dir"] == "."]
    busy = active_job(rows, planned.kind)
    if busy:
        raise UserError(f"{planned.run_dir} already has {planned.kind} job {busy} queued or running: wait for it to "
                        f"end (or cancel it) before submitting again")
    submitter = Submitter(opts, planned.run_dir)
    submitter.check(planned)
    submitter.submit(planned)
    submitter.summary()
    return 0 if not opts.wait or submitter.wait() else 1


def run_train(opts: argparse.Namespace, command: list[str]) -> int:
    planned, done = train_job(command, opts.max_requeues)
    if done is not None:
        print(f"{planned.run_dir}: finished at epoch {done}, nothing to submit")
        return 0
    return _submit_one(opts, planned)


def run_eval(opts: argparse.Namespace, command: list[str]) -> int:
    planned, _ = eval_job(command, opts.max_requeues)
    return _submit_one(opts, planned)


def _eval_args(text: Optional[str]) -> list[str]:
    try:
        args = shlex.split(text or "")
    except ValueError as e:
        raise UserError(f"--eval-args {text!r}: {e} (quote it as one string)") from None
    for flag in ("--out", "--resume"):
        if flag in args:
            raise UserError(f"{flag} in --eval-args: a sweep evaluates each run into RUN/eval and resumes it itself")
    return args


def run_sweep(opts: argparse.Namespace, command: list[str]) -> int:
    folder = Path(opts.out)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} exists and is not a folder: choose another --out")
    grid = parse_grid(opts.grid)
    check_train_args(command, grid)
    seeds = list(dict.fromkeys(opts.seeds)) if opts.seeds else default_seeds(command)
    sweep = merge(folder, Sweep(list(command), _eval_args(opts.eval_args), grid, seeds))
    plans = plan_sweep(sweep, folder, opts.max_requeues)
    submitter = Submitter(opts, folder)
    first = next((p.train or p.eval for p in plans if p.train or p.eval), None)
    if first is not None:
        submitter.check(first)
    sweep.save(folder)
    for plan in plans:
        print(f"{plan.dir}: {'; '.join(plan.notes) or 'nothing to do'}")
        after = submitter.submit(plan.train) if plan.train else plan.after
        if plan.eval is None:
            continue
        if plan.train is not None and after is None:
            continue  # the local training failed: submit() said so
        if plan.train is None and after is not None and opts.executor == "local":
            print(f"{plan.dir}: evaluation not submitted: submit again once training job {after} has ended")
            continue
        submitter.submit(plan.eval, after=after)
    n_points = len(sweep.points())
    print(f"sweep {folder}: {len(sweep.runs)} runs ({n_points} grid points x {len(sweep.seeds)} seeds), manifest "
          f"{folder / 'sweep.yaml'}")
    if not submitter.jobs:
        print("nothing to submit: every run is finished (and evaluated) or still queued")
        return 0
    submitter.summary()
    print(f"when they are done: python -m evaluation.compare {folder}")
    return 0 if not opts.wait or submitter.wait() else 1


def run(argv: list[str]) -> int:
    own, command = split_argv(argv)
    opts = build_parser().parse_args(own)
    what = "train_at.py" if opts.command != "eval" else "eval_autoattack.py"
    if not command:
        raise UserError(f"give the {what} arguments after --: python submit.py {opts.command} [options] -- "
                        f"{'--preset quickstart --out runs/qs' if what == 'train_at.py' else 'runs/qs --attacks aa'}")
    check_cluster_options(opts)
    return {"train": run_train, "eval": run_eval, "sweep": run_sweep}[opts.command](opts, command)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; ``UserError`` becomes one ``error: ...`` line on stderr and exit code 2."""
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        return UserError.exit_code
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("interrupted: the jobs submitted so far are listed in jobs.csv and keep running", file=sys.stderr)
        return 130
