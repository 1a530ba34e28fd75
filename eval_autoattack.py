"""Evaluate a model with clean, PGD, CW and AutoAttack over several epsilons, as in the paper.

    python eval_autoattack.py runs/c100-gkl --eps 2 4 6 8 10 12 --attacks pgd10 pgd20 cw10 cw20 aa
    python eval_autoattack.py model.pt --arch wrn-34-10 --dataset cifar100 --eps 8/255 --attacks aa
    python eval_autoattack.py --robustbench-model Carmon2019Unlabeled --model-dir ~/models --attacks aa
    python eval_autoattack.py runs/c10-gkl --norm Linf L2 L1 --attacks clean aa corruptions --data-dir ~/data
    python eval_autoattack.py runs/c100-gkl --resume            # continue it with the settings it saved

    torchrun --nproc_per_node 8 eval_autoattack.py runs/c100-gkl --attacks aa   # points sharded over 8 GPUs

Writes config.yaml / report.json / report.md / table_eps.csv / table_attacks.csv / per_sample.csv /
per_class.csv / robust_vs_eps.png into --out (default RUN/eval); further norms and the corruptions add
a section to report.json and report.md and their own files. ``--resume`` continues an interrupted run.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from core import process  # first: it notes the launcher's PID before the slow imports (see core.process)

if __name__ == "__main__":  # before the slow imports below: a Ctrl-C from the first moment on is one line
    process.script_start("interrupted before the evaluation started; nothing was written")

from core.cli import ArgumentParser
from core.flags import add_dataclass_flags, given_values
from errors import UserError
from evaluation.command import main as evaluate
from evaluation.config import EvalConfig, read_saved
from evaluation.sharding import env_rank


def build_parser() -> argparse.ArgumentParser:
    """One flag per field of ``EvalConfig``, plus --print-config."""
    p = ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, EvalConfig)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The flags given, over the settings saved in ``OUT/config.yaml`` with ``--resume``, over the defaults."""
    given = given_values(args, EvalConfig)
    names_out = any(k in given for k in ("source", "robustbench_model", "out"))
    saved = read_saved(EvalConfig.from_dict(given).out_dir()) if given.get("resume") and names_out else {}
    return EvalConfig.from_dict({**saved, **given})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; ``UserError`` becomes ``error: <message>`` on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    process.end_with_launcher()
    with process.stop_signals():
        try:
            args = build_parser().parse_args(argv)
            return evaluate(config_from_args(args), argv=argv, print_config=args.print_config)
        except UserError as e:
            if env_rank() == 0:  # under torchrun every process finds the same mistake; one says it
                print(f"error: {e}", file=sys.stderr)
            return UserError.exit_code
        except SystemExit as e:  # --help
            return int(e.code or 0)
        except KeyboardInterrupt as e:
            print("interrupted: finished (eps, attack, chunk) results are kept; rerun with --resume", file=sys.stderr)
            return 128 + getattr(e, "signum", 2)


if __name__ == "__main__":
    sys.exit(process.script_end(main()))
