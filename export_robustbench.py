"""Export a trained model for RobustBench: strict-loading weights, zoo entry, model_info, claim.

    python export_robustbench.py runs/c100-gkl --model-name Author2024GKL_WRN-34-10 \\
        --name "Generalized KL ..." --authors "A, B" --venue "TPAMI 2024" --link https://arxiv.org/...
    python export_robustbench.py runs/c100-gkl --claim --data-dir ~/data     # + RobustBench's own AA
    python export_robustbench.py weights.pt --arch wrn-34-10 --dataset cifar100 --allow-unevaluated

Reads the measured figures from RUN/eval/report.json (eval_autoattack.py): clean and AutoAttack
accuracy per norm, the corruptions mean. Exports every RobustBench board (Linf, L2, corruptions)
the report has results for, or the one --norm names. Writes into --out (default RUN/robustbench):
models/<dataset>/<board>/<name>.pt|.safetensors, model_info/<dataset>/<board>/<name>.json,
zoo_entry.py, export.json (and claim.json).
Exit codes: 0 done, 1 the exported weights do not reproduce the model, 2 a usage error.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from core import process  # first: it notes the launcher's PID before the slow imports (see core.process)

if __name__ == "__main__":  # before the slow imports below: a Ctrl-C from the first moment on is one line
    process.script_start("interrupted before the export started; nothing was written")

from checkpoints import run_folder
from checkpoints.run import default_out_dir
from core.cli import ArgumentParser as _Parser
from core.threat import parse_eps
from errors import UserError
from export import (
    FORMATS,
    FULL_TEST_SET,
    THREAT_MODELS,
    WEIGHT_CHOICES,
    ExportMismatch,
    ExportRequest,
    ModelCard,
    export,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line; every option maps to a field of ``export.ExportRequest``."""
    p = _Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run folder, project checkpoint .pt, or plain state dict .pt (with --arch)")
    p.add_argument("--out", default=None, help="output folder (default RUN/robustbench)")
    p.add_argument("--model-name", default=None, help="model-zoo name, e.g. Author2024GKL_WRN-34-10 "
                                                      "(default: the run folder's name)")
    p.add_argument("--weights", choices=WEIGHT_CHOICES, default="avg",
                   help="avg (default) or raw weights of --checkpoint; last = raw weights of last.pt; "
                        "best = best.pt as selected (averaged when the run averaged)")
    p.add_argument("--checkpoint", default=None, help="last (default), best or epoch_NNNN in a run folder")
    p.add_argument("--arch", default=None, help="architecture of a plain state dict (e.g. wrn-34-10)")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's dataset")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="pt", help="weights file format (default pt)")
    p.add_argument("--eval-json", nargs="+", default=None,
                   help="report.json file(s) of eval_autoattack.py (default RUN/eval/report.json); each board's "
                        "figures come from the one report that has them")
    p.add_argument("--allow-unevaluated", action="store_true", help="export without measured accuracies")
    p.add_argument("--norm", choices=THREAT_MODELS, default=None,
                   help="export this board only (default: every board with results, the run's training norm first)")
    p.add_argument("--eps", default=None, help="radius of the first board (default: the board's own, RobustBench's "
                                               "8/255 or 0.5, whatever radius the run trained at)")
    card = p.add_argument_group("model_info fields only a human knows")
    card.add_argument("--name", default="", help="paper title")
    card.add_argument("--authors", default="", help="comma-separated authors")
    card.add_argument("--venue", default="", help="e.g. 'TPAMI 2024' (empty: RobustBench shows Unpublished)")
    card.add_argument("--link", default="", help="URL of the paper")
    card.add_argument("--footnote", default=None, help="e.g. 'It uses additional 50M synthetic images in training.'")
    card.add_argument("--additional-data", action="store_true", help="trained with extra real data")
    card.add_argument("--forward-passes", type=int, default=1, help="number_forward_passes (default 1)")
    card.add_argument("--reported", type=float, default=None,
                      help="robust accuracy %% in the paper, for the first board (default: the measured figure)")
    claim = p.add_argument_group("claim: robustbench.eval.benchmark on the exported file, offline")
    claim.add_argument("--claim", action="store_true", help="run RobustBench's own evaluation for each board")
    claim.add_argument("--data-dir", default=None, help="folder holding the CIFAR test files and, for the corruptions "
                                                        "board, CIFAR-10-C/ or CIFAR-100-C/ (default: the run's)")
    claim.add_argument("--claim-n", type=int, default=FULL_TEST_SET, help=f"test points (default {FULL_TEST_SET})")
    claim.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--verify-n", type=int, default=16, help="random inputs for the logit check (default 16)")
    return p


def request_from_args(args: argparse.Namespace):
    """The ``ExportRequest`` for parsed arguments."""
    card = ModelCard(link=args.link, name=args.name, authors=args.authors, venue=args.venue,
                     additional_data=args.additional_data, number_forward_passes=args.forward_passes,
                     reported=args.reported, footnote=args.footnote)
    eps = _parse_radius(args.eps, args.norm) if args.eps is not None else None
    return ExportRequest(source=args.source, out=args.out, weights=args.weights, checkpoint=args.checkpoint,
                         arch=args.arch, dataset=args.dataset, model_name=args.model_name, eval_json=args.eval_json,
                         allow_unevaluated=args.allow_unevaluated, norm=args.norm, eps=eps, fmt=args.fmt,
                         card=card, claim=args.claim, data_dir=args.data_dir, claim_n=args.claim_n,
                         batch_size=args.batch_size, device=args.device, verify_n=args.verify_n)


def _parse_radius(text: str, norm: Optional[str]) -> float:
    """A radius in its board's notation: Linf 8, 8/255 or 0.0314; L2 as written (0.5 stays 0.5)."""
    if norm == "corruptions":
        raise UserError("--eps has no meaning for the corruptions board: drop it")
    value = parse_eps(text, norm or "Linf")
    if not value > 0:
        raise UserError(f"--eps must be positive, got {text}")
    return value


def print_result(result) -> None:
    """The verification line, the written paths and the notes."""
    print(f"verified: strict load into RobustBench's class, max |logit diff| = {result.max_abs_diff:.3e} "
          f"(< 1e-5 fp32)")
    check = result.maintainer_check
    if check.get("loader"):
        diffs = check["max_abs_logit_diff"]
        print(f"verified: {check['loader']}(model_dir={check['model_dir']}) loads zoo_entry.py's model for "
              f"{', '.join(diffs)}, max |logit diff| = {max(diffs.values()):.3e}")
    for board, done in result.boards.items():
        info = done.model_info
        figure = f"AA {info['autoattack_acc']}" if "autoattack_acc" in info else \
            f"corruptions {info['corruptions_acc']}"
        eps = f" eps {info['eps']}" if info.get("eps") else ""
        print(f"model_info {board}: {info['architecture']} {info['dataset']}{eps} clean {info['clean_acc']} {figure}"
              f" -> {done.model_info_path}")
    for label, path in (("weights", result.weights), ("zoo entry", result.zoo_entry), ("claim", result.claim_path),
                        ("record", result.record)):
        if path is not None:
            print(f"{label}: {path}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
        return  # the libraries' own deprecations on import (robustbench's torch.jit), not about this export
    print(f"note: {message}", file=sys.stderr)


def report_folders(request: ExportRequest) -> list[Path]:
    """The evaluation folders whose reports the export reads (``--eval-json``'s, else RUN/eval)."""
    given = [request.eval_json] if isinstance(request.eval_json, str) else list(request.eval_json or [])
    return [Path(p).parent for p in given] or [default_out_dir(request.source, "eval")]


def run_export(request: ExportRequest) -> int:
    """Export ``request`` and print the outcome; returns the exit code (0, 1 mismatch, 2 user error).

    The evaluations it reads are held as a reader: an evaluation writing there refuses to start, and an
    export is refused while one is writing."""
    try:
        with run_folder.reading(report_folders(request), "export"), warnings.catch_warnings():
            warnings.showwarning = _note  # e.g. "no averaged weights": one note line, not a warning with its source
            result = export(request)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    except ExportMismatch as e:
        print(f"export verification failed: {e}", file=sys.stderr)
        return ExportMismatch.exit_code
    except OSError as e:  # a full disk or a read-only --out
        print(f"error: cannot write the export: {e} (choose another --out)", file=sys.stderr)
        return UserError.exit_code
    print_result(result)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: parse, export, print; ``UserError`` is one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with process.stop_signals():
        try:
            request = request_from_args(build_parser().parse_args(argv))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return UserError.exit_code
        except SystemExit as e:  # --help
            return int(e.code or 0)
        try:
            return run_export(request)
        except KeyboardInterrupt as e:
            print("interrupted: the export is incomplete; run it again", file=sys.stderr)
            return 128 + getattr(e, "signum", 2)


if __name__ == "__main__":
    sys.exit(process.script_end(main()))
