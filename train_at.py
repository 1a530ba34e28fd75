#!/usr/bin/env python
"""Train a robust classifier with GKL-AT (or a baseline) from a preset plus overrides.

    python train_at.py --preset quickstart --out runs/quickstart
    python train_at.py --preset cifar100-gkl --data-dir ~/data --out runs/c100-gkl
    torchrun --nproc_per_node 8 train_at.py --preset cifar10-gkl-dm --generated ~/edm/shards --out runs/dm
    python train_at.py --resume runs/c100-gkl
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional

from core import process  # first: it notes the launcher's PID before the slow imports (see core.process)

if __name__ == "__main__":  # before the slow imports below: a Ctrl-C from the first moment on is one line
    process.script_start("interrupted before training started; nothing was saved")

from core.cli import ArgumentParser
from errors import UserError
from training.command import EXIT_CODES, EXIT_DIVERGED, TrainRequest, request_from_args  # noqa: F401 (API)
from training.command import main as train_main
from training.config import add_config_arguments, list_presets


def get_args_parser() -> argparse.ArgumentParser:
    """The command line: how to run, plus one flag per config key (``training.config``)."""
    p = ArgumentParser(description=__doc__, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"one of: {', '.join(list_presets())}")
    p.add_argument("--config", help="a YAML file of config keys (applied after --preset)")
    p.add_argument("--out", help="run folder for checkpoints, logs and plots (default runs/<preset>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a folder that holds another run; its checkpoints, log and eval/ are deleted")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--print-schedule", action="store_true", help="print eps / attack steps / lr per epoch and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.add_argument("--verify-generated", action="store_true", help="check the SHA-256 of every --generated shard "
                   "against its index.json first (reads the whole set)")
    add_config_arguments(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; ``UserError`` becomes one ``error: ...`` line on stderr and exit code 2."""
    process.end_with_launcher()
    with process.stop_signals():
        try:
            return train_main(request_from_args(get_args_parser().parse_args(argv)))
        except UserError as e:
            print("error: " + str(e).replace("\n", " "), file=sys.stderr)
            return UserError.exit_code
        except SystemExit as e:  # --help
            return int(e.code or 0)
        except KeyboardInterrupt as e:
            print("interrupted before training started; nothing was saved", file=sys.stderr)
            return 128 + getattr(e, "signum", signal.SIGINT)


if __name__ == "__main__":
    sys.exit(process.script_end(main()))
