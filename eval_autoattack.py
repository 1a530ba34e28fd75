"""Evaluate a model with clean, PGD, CW and AutoAttack over several epsilons, as in the paper.

    python eval_autoattack.py runs/c100-gkl --eps 2 4 6 8 10 12 --attacks pgd10 pgd20 cw10 cw20 aa
    python eval_autoattack.py model.pt --arch wrn-34-10 --dataset cifar100 --eps 8/255 --attacks aa
    python eval_autoattack.py --robustbench-model Carmon2019Unlabeled --model-dir ~/models --attacks aa

    torchrun --nproc_per_node 8 eval_autoattack.py runs/c100-gkl --attacks aa   # points sharded over 8 GPUs

Writes report.json / report.md / table_eps.csv / table_attacks.csv / per_sample.csv / per_class.csv /
robust_vs_eps.png into --out (default RUN/eval). ``--resume`` continues an interrupted run.
Under torchrun every process attacks its share of the points' chunks and rank 0 writes the
reports, identical to a single process's (evaluation.sharding).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from errors import UserError

DEFAULT_OUT = "eval"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are ``UserError`` (one line, exit 2) rather than usage dumps."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    from checkpoints.run import WEIGHTS
    from data import DATASETS
    from evaluation.inputs import SPLITS
    from evaluation.sharding import DEFAULT_CHUNK_SIZE
    from evaluation.spec import EXAMPLES
    from core.threat import NORMS

    p = _Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="run folder, project checkpoint .pt, or plain state dict .pt")
    p.add_argument("--robustbench-model", metavar="NAME", help="a RobustBench model-zoo name instead of SOURCE")
    p.add_argument("--model-dir", default="./models", help="RobustBench model folder (default ./models)")
    p.add_argument("--eps", nargs="+", default=["8/255"], help="radii: 8, 8/255 or 0.0314 (default 8/255)")
    p.add_argument("--attacks", nargs="+", default=["aa"], help=f"from: {EXAMPLES} (default aa)")
    p.add_argument("--n-ex", type=int, default=None, help="evaluate the first N points (default all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"points per chunk, the unit of work, seeding and resume (default {DEFAULT_CHUNK_SIZE}); "
                        "results depend on it, never on the number of processes")
    p.add_argument("--norm", choices=NORMS, default=None, help="default: the run's training norm, else Linf")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", default=None, help="default: the run's data_dir, else ./datasets")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--weights", choices=WEIGHTS, default="avg", help="averaged (default) or raw weights")
    p.add_argument("--checkpoint", default="last", help="last (default), best, or epoch_NNNN in a run folder")
    p.add_argument("--arch", default=None, help="architecture of a plain state dict (e.g. wrn-34-10)")
    p.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    p.add_argument("--resume", action="store_true", help="reuse finished results and AutoAttack state in --out")
    p.add_argument("--save-adv", action="store_true", help="save adversarial examples under --out/adv")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-attack lines")
    return p


def _validate(args: argparse.Namespace):
    """Check every cheap argument before anything is loaded or written."""
    from core.threat import parse_eps
    from evaluation.results import SuiteSettings

    if (args.source is None) == (args.robustbench_model is None):
        raise UserError("pass exactly one model: a SOURCE path or --robustbench-model NAME")
    if args.n_ex is not None and args.n_ex <= 0:
        raise UserError(f"--n-ex must be a positive number of images, got {args.n_ex}")
    eps = [parse_eps(e) for e in args.eps]
    return SuiteSettings.build(eps, args.attacks, norm=args.norm or "Linf", seed=args.seed,
                               batch_size=args.batch_size, chunk_size=args.chunk_size)


def _load(args: argparse.Namespace, device) -> tuple[Any, dict[str, Any]]:
    from checkpoints.run import load_model, load_robustbench_model
    from data import NUM_CLASSES

    if args.robustbench_model:
        return load_robustbench_model(args.robustbench_model, model_dir=args.model_dir,
                                      dataset=args.dataset or "cifar10", threat_model=args.norm or "Linf",
                                      device=device)
    num_classes = NUM_CLASSES[args.dataset] if args.dataset else None
    with warnings.catch_warnings(record=True):  # the same text comes back in info["notes"], printed once
        return load_model(args.source, weights=args.weights, checkpoint=args.checkpoint, arch=args.arch,
                          num_classes=num_classes, device=device)


def _default_out(args: argparse.Namespace) -> Path:
    from checkpoints.run import default_out_dir

    if args.out:
        return Path(args.out)
    if args.robustbench_model:
        return Path(DEFAULT_OUT) / args.robustbench_model
    return default_out_dir(args.source, DEFAULT_OUT)


def _identity(info: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """What identifies the evaluated model and points, for the resume cache."""
    path = Path(info["path"])
    stat = path.stat() if path.is_file() else None
    return {"model": {k: info.get(k) for k in ("path", "kind", "arch", "epoch", "global_step", "weights")},
            "file": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns} if stat else None,
            "data": {k: data[k] for k in ("dataset", "split", "n", "points")}}


def run(args: argparse.Namespace) -> int:
    """Validate, load, evaluate, write reports; returns the exit code."""
    from evaluation import ResultStore, environment_info, load_eval_data, run_suite, summary_line, write_reports
    from core.device import resolve_device
    from evaluation import sharding
    from evaluation.inputs import points_identity
    from evaluation.results import SuiteSettings
    from evaluation.store import check_resume

    settings = _validate(args)
    world = sharding.env_world_size()
    device = sharding.device_for(resolve_device(args.device), world)
    start = time.perf_counter()
    model, info = _load(args, device)
    config = info.get("config") or {}
    if args.norm is None and config.get("norm"):
        settings = SuiteSettings.build(settings.eps, [a.name for a in settings.attacks], norm=config["norm"],
                                       seed=settings.seed, batch_size=settings.batch_size,
                                       chunk_size=settings.chunk_size)
    dataset = args.dataset or info.get("dataset") or config.get("dataset")
    if dataset is None:
        raise UserError("cannot tell which dataset this model was trained on: pass --dataset")
    data_dir = args.data_dir or config.get("data_dir") or "./datasets"
    x, y = load_eval_data(dataset, args.split, data_dir, args.n_ex)
    data = {"dataset": dataset, "split": args.split, "n": len(y), "n_ex": args.n_ex, "data_dir": data_dir,
            "description": f"{dataset} {args.split} split, first {len(y)} points", "points": points_identity(x, y)}
    out = _default_out(args)
    sharding.check_world_size(len(y), settings.chunk_size, world)
    if args.resume:
        check_resume(out / "cache", list(settings.eps), settings.chunk_size)
    shard = sharding.start(device)
    try:
        store = ResultStore(out / "cache", _identity(info, data), resume=args.resume)
        if shard.is_main:
            store.write_manifest(list(settings.eps), settings.chunk_size)
            _echo(args, settings, info, data, out)
        result = run_suite(model, x, y, settings, store=store, adv_dir=(out / "adv") if args.save_adv else None,
                           progress=not args.quiet, shard=shard)
        if not shard.is_main:
            return 0
        meta = {"model": dict(info), "data": data,
                "environment": {**environment_info(device), "processes": shard.world_size},
                "command": " ".join(["eval_autoattack.py"] + list(args.argv)), "out": str(out),
                "wall_seconds": round(time.perf_counter() - start, 2)}
        paths = write_reports(result, out, meta)
        print(f"{summary_line(result)} | report: {paths['markdown']}")
        return 0
    finally:
        sharding.stop()


def _echo(args: argparse.Namespace, settings, info: dict[str, Any], data: dict[str, Any], out: Path) -> None:
    from core.threat import eps_str

    for note in info.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if args.quiet:
        return
    print(f"model {info.get('source')} ({info.get('arch')}, weights {info.get('weights')}, epoch "
          f"{info.get('epoch')}) | {data['description']} | {settings.norm} eps "
          f"{' '.join(eps_str(e) for e in settings.eps)} | attacks {' '.join(a.name for a in settings.attacks)} "
          f"| seed {settings.seed} | out {out}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; ``UserError`` becomes ``error: <message>`` on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return run(args)
    except UserError as e:
        from evaluation.sharding import env_rank

        if env_rank() == 0:  # under torchrun every process finds the same mistake; one says it
            print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("interrupted: finished (eps, attack, chunk) results are kept; rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
