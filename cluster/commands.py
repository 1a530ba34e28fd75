"""The commands a job runs, checked by the scripts' own parsers before anything is submitted.

``train_job`` and ``eval_job`` read the arguments exactly as ``train_at.py`` and
``eval_autoattack.py`` would (same parser, same config resolution, same run-folder rules), so a
mistake ends in one ``error:`` line on the login node instead of a failed job after a queue wait.
``config_key`` asks the training parser whether a name is a config key (with any alias it accepts).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from errors import UserError

from .job import CommandJob


@dataclass
class Planned:
    """A job to submit, with what ``submit.py`` prints and records about it."""

    job: CommandJob
    run_dir: Path  # the run folder (for an evaluation: the evaluated run, else its --out)
    name: str  # the job's name in the queue

    @property
    def kind(self) -> str:
        return self.job.kind


def train_parser() -> argparse.ArgumentParser:
    """``train_at.py``'s own argument parser."""
    import train_at

    return train_at.get_args_parser()


def config_key(name: str) -> str:
    """The config key a ``--grid`` name sets (``attack-alpha`` -> ``attack_alpha``), as the training parser
    reads it; a ``UserError`` for anything that is not a config key."""
    flag = "--" + name.strip().lstrip("-").replace("_", "-")
    parser = train_parser()
    action = parser._option_string_actions.get(flag)  # argparse's own table of the options
    if action is None or not action.dest.startswith("cfg_"):
        raise UserError(f"--grid {name}: not a config key of train_at.py (see python train_at.py --help, "
                        "'config overrides')")
    return action.dest[len("cfg_"):]


def key_flag(key: str) -> str:
    """The command-line flag of config key ``key``."""
    return "--" + key.replace("_", "-")


def _resume_argv(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """``--resume RUN`` plus the given arguments a resume may carry over (device, workers, data paths...)."""
    from training.command import RESUME_OVERRIDABLE

    argv = ["--resume", str(run_dir)]
    for key in sorted(RESUME_OVERRIDABLE):
        value = getattr(args, f"cfg_{key}", None)
        if value is not None:
            argv += [key_flag(key), str(value)]
    return argv + ["--no-progress"] * bool(args.no_progress)


_NOTES_SHOWN: set[str] = set()


def parse_train(argv: list[str]):
    """``(args, cfg, run_dir, resuming)`` as ``train_at.py`` resolves ``argv``; nothing is written.

    The notes the resolution prints (e.g. old key names read under new ones) are printed once per
    submission, not once per run of a sweep.
    """
    from training.command import request_from_args

    args = train_parser().parse_args(argv)
    if args.print_config or args.print_schedule:
        raise UserError("--print-config / --print-schedule print and exit: run them with train_at.py directly")
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            request = request_from_args(args)
    finally:
        for line in said.getvalue().splitlines():
            if line not in _NOTES_SHOWN:
                _NOTES_SHOWN.add(line)
                print(line, file=sys.stderr)
    return args, request.cfg, request.run_dir, request.resuming


def finished_epoch(run_dir: Path, epochs: int) -> Optional[int]:
    """The last epoch when the run in ``run_dir`` is finished, else None."""
    from checkpoints.run_folder import finished_epoch as finished

    return finished(run_dir, epochs)[0]


def train_job(argv: list[str], max_requeues: int, *, resume_first: bool = False) -> tuple[Planned, Optional[int]]:
    """The job of ``train_at.py argv`` and, for a finished run, its last epoch (then nothing is to be done).

    ``resume_first``: the first allocation resumes too (a resubmitted sweep run with checkpoints).
    """
    from checkpoints.run_folder import check_new_run

    args, cfg, run_dir, resuming = parse_train(argv)
    if resuming:
        done = finished_epoch(run_dir, cfg.epochs)
        if done is not None:
            return Planned(CommandJob("train", argv, argv, str(run_dir)), run_dir, ""), done
    elif not resume_first:
        check_new_run(run_dir, args.overwrite)
    resume = _resume_argv(args, run_dir)
    job = CommandJob("train", resume if resume_first else list(argv), resume, str(run_dir), max_requeues,
                     checkpoints=str(run_dir / "checkpoints"))
    return Planned(job, run_dir, f"train:{run_dir.name}"), None


def eval_job(argv: list[str], max_requeues: int, *, source_may_wait: bool = False) -> tuple[Planned, Path]:
    """The job of ``eval_autoattack.py argv`` and its output folder.

    ``source_may_wait``: the evaluated run is made by a training job that has not run yet.
    """
    import eval_autoattack

    cfg = eval_autoattack.config_from_args(eval_autoattack.build_parser().parse_args(argv)).validate()
    if cfg.source and not source_may_wait and not Path(cfg.source).exists():
        raise UserError(f"{cfg.source}: no such run folder or checkpoint to evaluate")
    out = cfg.out_dir()
    resume = list(argv) + ([] if cfg.resume else ["--resume"])
    source = Path(cfg.source) if cfg.source else None
    run_dir = source if source is not None and (source.is_dir() or source_may_wait) else out
    job = CommandJob("eval", list(argv), resume, str(out), max_requeues)
    return Planned(job, run_dir, f"eval:{run_dir.name or out.name}"), out
