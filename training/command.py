"""What ``train_at.py`` does: a typed request from the command line, then :func:`main` (checks, trainer, exit code).

The run-folder rules (lock, write probe, free space, overwrite, finished runs) are
:mod:`checkpoints.run_folder`'s; this module applies them in order and turns the ways a run
stops into exit codes (:data:`EXIT_CODES`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import yaml

from checkpoints import run_folder
from checkpoints.io import tensor_bytes
from core.distributed import world_size_from_env
from data.generated import verify_shards
from errors import UserError

from .config import TrainConfig, build_config, load_preset, load_yaml
from .schedules import lr_formula, schedule_table
from .trainer import Trainer, TrainingDiverged, TrainingStopped

RESUME_OVERRIDABLE = {"device", "workers", "checkpoint_every_steps", "data_dir", "generated", "keep_checkpoints",
                      "tracker"}
EXIT_DIVERGED = 3
EXIT_CODES = """\
exit codes:
  0         training finished (or --resume of a finished run: "finished at epoch E, nothing to do", nothing touched)
  2         bad arguments, data, run folder or checkpoint (one line on stderr; files already on disk unchanged),
            or the run folder is in use by another trainer (the message names its PID)
  3         training diverged (non-finite loss or weights): the last good checkpoint is kept
  130, 143  stopped by SIGINT (Ctrl-C) / SIGTERM: a checkpoint of the current step was saved at the step's
            end; continue with --resume RUN_DIR (a second signal stops at once, keeping the previous one)
A SIGKILL at any moment leaves the previous complete checkpoint: every write goes to a temp file that is
renamed into place once complete, and --resume removes leftover temp files. Under torchrun the workers
end with their launcher (killing the job's process group kills them too; see core/process.py).
"""


@dataclass(frozen=True)
class TrainRequest:
    """One invocation of train_at.py: the resolved config, its run folder and how to run it."""

    cfg: TrainConfig
    run_dir: Path
    resuming: bool
    overwrite: bool = False
    progress: bool = True
    verify_generated: bool = False
    show: Optional[str] = None  # "config" or "schedule": print it and exit


def request_from_args(args: argparse.Namespace) -> TrainRequest:
    """The request for parsed arguments (new run or resume); every cheap check happens here."""
    show = "config" if args.print_config else "schedule" if args.print_schedule else None
    options = dict(overwrite=args.overwrite, progress=not args.no_progress, verify_generated=args.verify_generated,
                   show=show)
    if args.resume:
        cfg, run_dir = _resumed(args)
        return TrainRequest(cfg, run_dir, True, **options)
    if not args.preset and not args.config:
        raise UserError("no --preset given: try --preset quickstart (see --help for the list)")
    base = load_yaml(args.config) if args.config else None
    if args.preset:
        base = {**load_preset(args.preset), **(base or {}), "preset": args.preset}
    cfg = build_config(None, args, base=base)
    return TrainRequest(cfg, Path(args.out or f"runs/{cfg.preset or 'run'}"), False, **options)


def _resumed(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    run_dir = Path(args.resume)
    if args.overwrite:
        raise UserError(f"--resume {run_dir} continues the run and --overwrite deletes it: pass one of them")
    if args.out and not _same_folder(Path(args.out), run_dir):
        raise UserError(f"--resume {run_dir} continues the run in its own folder: drop --out {args.out} "
                        "(to start a copy elsewhere, copy the folder first)")
    run_folder.check_resumable(run_dir)
    overridden = {k[4:] for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    bad = sorted(overridden - RESUME_OVERRIDABLE)
    if bad or args.preset or args.config:
        what = ", ".join(f"--{b.replace('_', '-')}" for b in bad) or "--preset/--config"
        raise UserError(f"{what} cannot change on --resume (the run continues with its saved config); "
                        f"only {', '.join(sorted(RESUME_OVERRIDABLE))} may")
    saved = load_yaml(run_dir / "config.yaml")
    if not saved:
        raise UserError(f"{run_dir / 'config.yaml'} is empty, so the run's config is lost: restore it (every "
                        "checkpoint holds a copy under 'config') or start a new run with --out")
    # Runs saved before the key existed dropped each epoch's last partial batch: they resume as they ran.
    return build_config(None, args, base={"drop_last": True, **saved}), run_dir


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(text: str) -> None:
    if _is_rank0():
        print(text, file=sys.stderr)


def check_world_size(batch_size: int) -> None:
    """The global batch must split evenly over the processes torchrun starts (checked before any init)."""
    world = world_size_from_env()
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is not divisible by the world size {world}: the global batch "
                        f"is split evenly across processes; use a multiple of {world}")


def show(request: TrainRequest) -> None:
    """``--print-config`` / ``--print-schedule``."""
    cfg = request.cfg
    if request.show == "config":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    else:
        print(lr_formula(cfg))
        print(pd.DataFrame(schedule_table(cfg)).to_string(index=False))


def main(request: TrainRequest) -> int:
    """Validate everything cheap, build the trainer, check the run folder, train; returns the exit code."""
    cfg, run_dir = request.cfg, request.run_dir
    if request.show:
        show(request)
        return 0
    if request.verify_generated and cfg.generated:
        verify_shards(cfg.generated, progress=request.progress)
    if request.resuming:
        done, notes = run_folder.finished_epoch(run_dir, cfg.epochs)
        if done is not None:
            for note in notes:
                _say(f"note: {note}")
            if _is_rank0():
                print(f"{run_dir}: finished at epoch {done}, nothing to do (evaluate it with: "
                      f"python eval_autoattack.py {run_dir})")
            return 0
    else:
        run_folder.check_new_run(run_dir, request.overwrite)
    run_folder.probe_writable(run_dir, create=False)
    check_world_size(cfg.batch_size)
    with contextlib.ExitStack() as stack:
        if request.resuming:  # before the resume removes leftover temp files, which a running process may be writing
            _hold(stack, run_dir, resuming=True)
        trainer = Trainer(cfg, run_dir, resume=request.resuming, progress=request.progress)
        run_folder.check_free_space(run_dir, tensor_bytes(trainer.state_dict()), cfg.epochs, cfg.keep_checkpoints)
        if not request.resuming:
            run_folder.probe_writable(run_dir, create=True)  # the first write of a new run: after every check
            _hold(stack, run_dir, resuming=False)
            if _is_rank0():  # again under the lock: a run may have written there meanwhile
                run_folder.check_new_run(run_dir, request.overwrite, locked=True)
            if request.overwrite and _is_rank0() and run_folder.clear_previous_run(run_dir):
                _say(f"--overwrite: removed the earlier run's checkpoints, log and evaluation in {run_dir}")
        return train(trainer, run_dir)


def _hold(stack: contextlib.ExitStack, run_dir: Path, resuming: bool) -> None:
    """Rank 0 holds the run folder's lock for the rest of the run."""
    if _is_rank0() and stack.enter_context(run_folder.run_lock(run_dir, resuming)) is None:
        _say(f"note: the file system of {run_dir} has no file locks: nothing stops a second trainer from "
             "writing into the same folder")


def train(trainer: Trainer, run_dir: Path) -> int:
    """Run ``trainer.fit`` and turn its ways of stopping into exit codes (see ``EXIT_CODES``)."""
    try:
        rows = trainer.fit()
    except TrainingStopped as e:
        signum = signal.Signals(e.signum or signal.SIGTERM)  # None on a rank that was told by another rank
        print(f"stopped by {signum.name} at global step {e.global_step}; checkpoint saved. "
              f"Continue with: python train_at.py --resume {run_dir}", file=sys.stderr)
        return 128 + signum
    except KeyboardInterrupt:
        signum = signal.Signals(trainer._stop_signal or signal.SIGINT)
        print(f"stopped at once by {signum.name}; the previous checkpoint is kept. "
              f"Continue with: python train_at.py --resume {run_dir}", file=sys.stderr)
        return 128 + signum
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    if rows and trainer.dist.is_main:
        last, m = rows[-1], trainer.monitor  # val: held-out images; seen: training images (no held-out split)
        print(f"done: {run_dir} | epoch {last['epoch']} {m} clean {last[f'{m}_clean']:.4f} "
              f"pgd {last[f'{m}_pgd']:.4f}" + (f" | averaged clean {last[f'{m}_clean_avg']:.4f} "
                                              f"pgd {last[f'{m}_pgd_avg']:.4f}" if f"{m}_pgd_avg" in last else ""))
    return 0

