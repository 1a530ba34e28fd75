#!/usr/bin/env python
"""Train a robust classifier with GKL-AT (or a baseline) from a preset plus overrides.

    python train_at.py --preset quickstart --out runs/quickstart
    python train_at.py --preset cifar100-gkl --data-dir ~/data --out runs/c100-gkl
    torchrun --nproc_per_node 8 train_at.py --preset cifar10-gkl-dm --generated ~/edm/shards --out runs/dm
    python train_at.py --resume runs/c100-gkl
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from errors import UserError

RESUME_OVERRIDABLE = {"device", "workers", "checkpoint_every_steps", "data_dir", "generated", "keep_checkpoints"}


def get_args_parser() -> argparse.ArgumentParser:
    from training.config import add_config_arguments, list_presets

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"one of: {', '.join(list_presets())}")
    p.add_argument("--config", help="a YAML file of config keys (applied after --preset)")
    p.add_argument("--out", help="run folder for checkpoints, logs and plots (default runs/<preset>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a folder that holds another run")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--print-schedule", action="store_true", help="print eps / attack steps / lr per epoch and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    add_config_arguments(p)
    return p


def resolve(args: argparse.Namespace):
    """Config and run folder from the arguments (new run or resume)."""
    from training.config import build_config, load_yaml

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "checkpoints" / "last.pt").is_file():
            raise UserError(f"--resume {run_dir}: no checkpoints/last.pt there (is it a run folder of train_at.py?)")
        overridden = {k[4:] for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
        bad = sorted(overridden - RESUME_OVERRIDABLE)
        if bad or args.preset or args.config:
            what = ", ".join(f"--{b.replace('_', '-')}" for b in bad) or "--preset/--config"
            raise UserError(f"{what} cannot change on --resume (the run continues with its saved config); "
                            f"only {', '.join(sorted(RESUME_OVERRIDABLE))} may")
        cfg = build_config(None, args, base=load_yaml(run_dir / "config.yaml"))
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
    """Refuse to start afresh over another run; make sure the folder is writable."""
    if (run_dir / "checkpoints" / "last.pt").exists() and not overwrite:
        raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                        "choose another --out, or pass --overwrite")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to run folder {run_dir}: {e.strerror}") from None


def main(argv: Optional[list[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        cfg, run_dir, resuming = resolve(args)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        if args.print_schedule:
            from training.schedules import schedule_table

            import pandas as pd

            print(pd.DataFrame(schedule_table(cfg)).to_string(index=False))
            return 0
        if not resuming:
            check_run_dir(run_dir, args.overwrite)
        from training.trainer import Trainer, TrainingDiverged

        trainer = Trainer(cfg, run_dir, resume=resuming, progress=not args.no_progress)
        try:
            rows = trainer.fit()
        except KeyboardInterrupt:
            print(f"stopped; checkpoint saved. Continue with: python train_at.py --resume {run_dir}", file=sys.stderr)
            return 0 if trainer._stop_signal is not None else 130
        except TrainingDiverged as e:
            print(f"error: training diverged: {e}", file=sys.stderr)
            return 3
        if rows:
            last = rows[-1]
            print(f"done: {run_dir} | epoch {last['epoch']} val clean {last['val_clean']:.4f} "
                  f"pgd {last['val_pgd']:.4f}" + (f" | averaged clean {last['val_clean_avg']:.4f} "
                                                  f"pgd {last['val_pgd_avg']:.4f}" if "val_pgd_avg" in last else ""))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
