#!/usr/bin/env python
"""Train a robust classifier with GKL-AT (or a baseline) from a preset plus overrides.

    python train_at.py --preset quickstart --out runs/quickstart
    python train_at.py --preset cifar100-gkl --data-dir ~/data --out runs/c100-gkl
    torchrun --nproc_per_node 8 train_at.py --preset cifar10-gkl-dm --generated ~/edm/shards --out runs/dm
    python train_at.py --resume runs/c100-gkl
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

from core.cli import ArgumentParser as _Parser
from errors import UserError

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
renamed into place once complete, and --resume removes leftover temp files.
"""


def get_args_parser() -> argparse.ArgumentParser:
    from training.config import add_config_arguments, list_presets

    p = _Parser(description=__doc__, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"one of: {', '.join(list_presets())}")
    p.add_argument("--config", help="a YAML file of config keys (applied after --preset)")
    p.add_argument("--out", help="run folder for checkpoints, logs and plots (default runs/<preset>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a folder that holds another run; its checkpoints, log and eval/ are deleted")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--print-schedule", action="store_true", help="print eps / attack steps / lr per epoch and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--verify-generated", action="store_true",
                   help="check the SHA-256 of every --generated shard against its index.json first (reads the whole set)")
    add_config_arguments(p)
    return p


def _has_checkpoints(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(folder.glob("*.pt"))


def resolve(args: argparse.Namespace):
    """Config and run folder from the arguments (new run or resume)."""
    from training.config import build_config, load_yaml

    if args.resume:
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise UserError(f"--resume {run_dir}: no such run folder")
        if not (run_dir / "config.yaml").is_file() or not _has_checkpoints(run_dir):
            raise UserError(f"--resume {run_dir}: no config.yaml and checkpoints/*.pt there, so nothing to resume "
                            "(is it a run folder of train_at.py? a run killed before its first checkpoint "
                            "starts afresh with --out)")
        overridden = {k[4:] for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
        bad = sorted(overridden - RESUME_OVERRIDABLE)
        if bad or args.preset or args.config:
            what = ", ".join(f"--{b.replace('_', '-')}" for b in bad) or "--preset/--config"
            raise UserError(f"{what} cannot change on --resume (the run continues with its saved config); "
                            f"only {', '.join(sorted(RESUME_OVERRIDABLE))} may")
        # Runs saved before the key existed dropped each epoch's last partial batch: they resume as they ran.
        cfg = build_config(None, args, base={"drop_last": True, **load_yaml(run_dir / "config.yaml")})
        return cfg, run_dir, True
    if not args.preset and not args.config:
        raise UserError("no --preset given: try --preset quickstart (see --help for the list)")
    base = load_yaml(args.config) if args.config else None
    if args.preset:
        from training.config import load_preset

        base = {**load_preset(args.preset), **(base or {}), "preset": args.preset}
    cfg = build_config(None, args, base=base)
    run_dir = Path(args.out or f"runs/{cfg.preset or 'run'}")
    return cfg, run_dir, False


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start afresh over another run or over a file; writes nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a folder: choose another --out")
    if _has_checkpoints(run_dir) and not overwrite:
        raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                        "choose another --out, or pass --overwrite")


def clear_previous_run(run_dir: Path) -> list[str]:
    """``--overwrite``: remove the earlier run's checkpoints, log and evaluation so none of them is
    mistaken for the new run's (a resume falls back to the newest epoch file). Rank 0 only."""
    if not _is_rank0():
        return []
    removed = []
    folder = run_dir / "checkpoints"
    for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
        path.unlink(missing_ok=True)
        removed.append(str(path))
    for name in ("log.csv", "training_curves.png"):
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed.append(str(run_dir / name))
    if (run_dir / "eval").is_dir():
        shutil.rmtree(run_dir / "eval")
        removed.append(str(run_dir / "eval"))
    return removed


def probe_run_dir(run_dir: Path) -> None:
    """Create the run folder if needed and prove it is writable (a full or read-only disk fails here)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe.{os.getpid()}"  # one per process: torchrun ranks probe at once
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to run folder {run_dir}: {e.strerror or e} "
                        "(free some space, fix its permissions or choose another --out)") from None


def check_world_size(batch_size: int) -> None:
    """The global batch must split evenly over the processes torchrun starts (checked before any init)."""
    from core.distributed import world_size_from_env

    world = world_size_from_env()
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is not divisible by the world size {world}: the global batch "
                        f"is split evenly across processes; use a multiple of {world}")


def check_free_space(trainer, run_dir: Path) -> None:
    """Enough disk for the checkpoints this run keeps at its peak.

    Every kept file is an independent copy: last.pt and its temp file while it is rewritten, best.pt,
    and the rolling epoch files (all of them with --keep-checkpoints 0), one of which is the temp file
    of the newest while it is copied. Files already there (a resume) are counted once per inode, as
    run folders of earlier versions hold hard links.
    """
    from checkpoints.io import ensure_free_space, tensor_bytes

    cfg = trainer.cfg
    size = tensor_bytes(trainer.state_dict()) + 2**20
    rolling = min(cfg.keep_checkpoints, cfg.epochs) if cfg.keep_checkpoints else cfg.epochs
    peak = size * (rolling + 3)
    folder = run_dir / "checkpoints"
    inodes = {p.stat().st_ino: p.stat().st_size for p in folder.glob("*.pt")} if folder.is_dir() else {}
    existing = next((p for p in (run_dir, *run_dir.absolute().parents) if p.is_dir()), Path("/"))
    ensure_free_space(existing, max(peak - sum(inodes.values()), size), f"the checkpoints of {run_dir}")


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def finished_epoch(run_dir: Path, epochs: int) -> tuple[Optional[int], list[str]]:
    """The last epoch of a finished run (its newest complete checkpoint ends epoch ``epochs``), else None,
    and the notes of what was skipped to find it. Only reads (tensors memory-mapped); any problem is left
    to the resume itself to report."""
    from checkpoints.io import load_latest_checkpoint

    try:
        _, state, notes = load_latest_checkpoint(run_dir / "checkpoints", mmap=True)
    except UserError:
        return None, []
    epoch = state.get("epoch") if isinstance(state, dict) else None
    if isinstance(epoch, int) and epoch >= epochs and not state.get("step_in_epoch"):
        return epoch, notes
    return None, []


def run_lock(run_dir: Path, resuming: bool):
    """The exclusive lock of the run folder (``RUN/.lock``), held by the process that writes (rank 0)."""
    from core.files import folder_lock

    if not _is_rank0():
        return contextlib.nullcontext()

    def busy(pid: Optional[int]) -> str:
        who = f"process {pid}" if pid else "another process"
        if resuming:
            return (f"--resume {run_dir}: the run is still going ({who} holds {run_dir / '.lock'}); "
                    f"wait for it to end or stop it{f' (kill {pid})' if pid else ''}, then resume")
        return (f"--out {run_dir} is in use by another training run ({who} holds {run_dir / '.lock'}): "
                "choose another --out, or wait for that run to end")

    return folder_lock(run_dir, busy)


def _hold(stack: contextlib.ExitStack, run_dir: Path, resuming: bool) -> None:
    if stack.enter_context(run_lock(run_dir, resuming)) is None and _is_rank0():
        print(f"note: the file system of {run_dir} has no file locks: nothing stops a second trainer from "
              "writing into the same folder", file=sys.stderr)


def train(trainer, run_dir: Path) -> int:
    """Run ``trainer.fit`` and turn its ways of stopping into exit codes (see ``EXIT_CODES``)."""
    from training.trainer import TrainingDiverged, TrainingStopped

    try:
        rows = trainer.fit()
    except TrainingStopped as e:
        signum = signal.Signals(e.signum or signal.SIGTERM)  # None on a rank that was told by another rank
        print(f"stopped by {signum.name} at global step {e.global_step}; checkpoint saved. "
              f"Continue with: python train_at.py --resume {run_dir}", file=sys.stderr)
        return 128 + signum
    except KeyboardInterrupt:
        signum = trainer._stop_signal or signal.SIGINT
        print(f"stopped at once by {signal.Signals(signum).name}; the previous checkpoint is kept. "
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


def run(args: argparse.Namespace) -> int:
    """Validate everything cheap, build the trainer, check the run folder, train."""
    cfg, run_dir, resuming = resolve(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.print_schedule:
        import pandas as pd

        from training.schedules import lr_formula, schedule_table

        print(lr_formula(cfg))
        print(pd.DataFrame(schedule_table(cfg)).to_string(index=False))
        return 0
    if args.verify_generated and cfg.generated:
        from data.generated import verify_shards

        verify_shards(cfg.generated, progress=not args.no_progress)
    if resuming:
        done, notes = finished_epoch(run_dir, cfg.epochs)
        if done is not None:
            if _is_rank0():
                for note in notes:
                    print(f"note: {note}", file=sys.stderr)
                print(f"{run_dir}: finished at epoch {done}, nothing to do (evaluate it with: "
                      f"python eval_autoattack.py {run_dir})")
            return 0
        probe_run_dir(run_dir)
    else:
        check_run_dir(run_dir, args.overwrite)
    check_world_size(cfg.batch_size)
    from training.trainer import Trainer

    with contextlib.ExitStack() as stack:
        if resuming:  # before the resume removes leftover temp files, which a running process may be writing
            _hold(stack, run_dir, resuming)
        trainer = Trainer(cfg, run_dir, resume=resuming, progress=not args.no_progress)
        check_free_space(trainer, run_dir)
        if not resuming:
            probe_run_dir(run_dir)  # the first write of a new run: nothing is created before all checks pass
            _hold(stack, run_dir, resuming)
            check_run_dir(run_dir, args.overwrite)  # again under the lock: a run may have written there meanwhile
            if args.overwrite and clear_previous_run(run_dir):
                print(f"--overwrite: removed the earlier run's checkpoints, log and evaluation in {run_dir}",
                      file=sys.stderr)
        return train(trainer, run_dir)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; ``UserError`` becomes one ``error: ...`` line on stderr and exit code 2."""
    try:
        return run(get_args_parser().parse_args(argv))
    except UserError as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        return UserError.exit_code
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
