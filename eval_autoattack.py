"""Evaluate a model with clean, PGD, CW and AutoAttack over several epsilons, as in the paper.

    python eval_autoattack.py runs/c100-gkl --eps 2 4 6 8 10 12 --attacks pgd10 pgd20 cw10 cw20 aa
    python eval_autoattack.py model.pt --arch wrn-34-10 --dataset cifar100 --eps 8/255 --attacks aa
    python eval_autoattack.py --robustbench-model Carmon2019Unlabeled --model-dir ~/models --attacks aa
    python eval_autoattack.py runs/c10-gkl --norm Linf L2 L1 --attacks clean aa corruptions --data-dir ~/data

    torchrun --nproc_per_node 8 eval_autoattack.py runs/c100-gkl --attacks aa   # points sharded over 8 GPUs

Writes report.json / report.md / table_eps.csv / table_attacks.csv / per_sample.csv / per_class.csv /
robust_vs_eps.png into --out (default RUN/eval); further norms and the corruptions add a section
to report.json and report.md and their own files. ``--resume`` continues an interrupted run.
Under torchrun every process attacks its share of the points' chunks and rank 0 writes the
reports, identical to a single process's (evaluation.sharding).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

from core.cli import ArgumentParser as _Parser
from errors import UserError

DEFAULT_OUT = "eval"


def build_parser() -> argparse.ArgumentParser:
    from checkpoints.run import WEIGHTS
    from core.threat import NORMS
    from data import DATASETS
    from evaluation.corruptions import CORRUPTIONS_ATTACK
    from evaluation.inputs import SPLITS
    from evaluation.sharding import DEFAULT_CHUNK_SIZE
    from evaluation.spec import attack_examples

    p = _Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="run folder, project checkpoint .pt, or plain state dict .pt")
    p.add_argument("--robustbench-model", metavar="NAME", help="a RobustBench model-zoo name instead of SOURCE")
    p.add_argument("--model-dir", default="./models", help="RobustBench model folder (default ./models)")
    p.add_argument("--eps", nargs="+", default=None,
                   help="radii in the norm's notation: Linf 8, 8/255 or 0.0314; L2 0.5; L1 12. With several "
                        "--norm write NORM:RADIUS (Linf:8/255 L2:0.5). Default: RobustBench's 8/255, 0.5 and 12")
    p.add_argument("--attacks", nargs="+", default=["aa"],
                   help=f"from: {attack_examples()}, and {CORRUPTIONS_ATTACK} (CIFAR-10-C/100-C from --data-dir) "
                        "(default aa)")
    p.add_argument("--n-ex", type=int, default=None,
                   help="evaluate the first N points (default all); with corruptions: per corruption and severity")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--norm", nargs="+", choices=NORMS, default=None,
                   help="one or more threat models, the first is the report's main one (default: the run's "
                        "training norm, else Linf)")
    p.add_argument("--corruptions", nargs="+", default=None, metavar="NAME",
                   help="with --attacks corruptions: a subset of the 15 (default all: RobustBench's figure)")
    p.add_argument("--severities", nargs="+", type=int, default=None, metavar="S",
                   help="with --attacks corruptions: a subset of the severities 1-5 (default all)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"points per chunk, the unit of work, seeding and resume (default {DEFAULT_CHUNK_SIZE}); "
                        "results depend on it, never on the number of processes")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", default=None, help="default: the run's data_dir, else ./datasets")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--weights", choices=WEIGHTS, default="avg", help="averaged (default) or raw weights")
    p.add_argument("--checkpoint", default="last", help="last (default), best, or epoch_NNNN in a run folder")
    p.add_argument("--arch", default=None, help="architecture of a plain state dict: a registry name (e.g. "
                   "wrn-34-10) or MODULE:CALLABLE (e.g. my_nets.py:make), a function or class returning the model")
    p.add_argument("--arch-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of a MODULE:CALLABLE architecture, a JSON object (e.g. '{\"width\": 64}')")
    p.add_argument("--out", default=None, help="output folder (default RUN/eval)")
    p.add_argument("--resume", action="store_true", help="reuse finished results and AutoAttack state in --out")
    p.add_argument("--save-adv", action="store_true", help="save adversarial examples under --out/adv")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-attack lines")
    p.add_argument("--tracker", default="tensorboard", help="where the accuracies also go: tensorboard (OUT/tb, the "
                   "default), wandb, mlflow or none (evaluation/tracking.py)")
    return p


def _validate(args: argparse.Namespace, norms: Optional[Sequence[str]] = None, *, radii_may_wait: bool = False):
    """Check every cheap argument before anything is loaded or written.

    Returns the suite settings per norm (the main norm first) and the corruption settings (or None).
    ``radii_may_wait``: radii that do not read in the default norm give no suites (None) instead of
    an error, to be read again in the run's own norm.
    """
    from core.threat import parse_radii
    from evaluation.corruptions import CORRUPTIONS_ATTACK, CorruptionSettings
    from evaluation.results import SuiteSettings

    from core.tracking import require

    require(args.tracker)
    if (args.source is None) == (args.robustbench_model is None):
        raise UserError("pass exactly one model: a SOURCE path or --robustbench-model NAME")
    if args.n_ex is not None and args.n_ex <= 0:
        raise UserError(f"--n-ex must be a positive number of images, got {args.n_ex}")
    norms = list(dict.fromkeys(norms or _chosen_norms(args) or ["Linf"]))
    attacks = [a for a in args.attacks if a.strip().lower() != CORRUPTIONS_ATTACK]
    corruptions = None
    if _with_corruptions(args):
        corruptions = CorruptionSettings.build(args.corruptions, args.severities, n_ex=args.n_ex,
                                               batch_size=args.batch_size)
    elif args.corruptions or args.severities:
        raise UserError(f"--corruptions and --severities choose what --attacks {CORRUPTIONS_ATTACK} evaluates: "
                        f"add {CORRUPTIONS_ATTACK} to --attacks")
    try:
        radii = parse_radii(args.eps, norms)
    except UserError:
        if not radii_may_wait:
            raise
        return None, corruptions
    suites = [SuiteSettings.build(radii[n], attacks, norm=n, seed=args.seed, batch_size=args.batch_size,
                                  chunk_size=args.chunk_size) for n in norms]
    return suites, corruptions


def _load(args: argparse.Namespace, device) -> tuple[Any, dict[str, Any]]:
    from checkpoints.run import load_model, load_robustbench_model
    from data import NUM_CLASSES

    if args.robustbench_model:
        board = args.norm[0] if args.norm and args.norm[0] in ("Linf", "L2") else "Linf"
        return load_robustbench_model(args.robustbench_model, model_dir=args.model_dir,
                                      dataset=args.dataset or "cifar10", threat_model=board, device=device)
    num_classes = NUM_CLASSES[args.dataset] if args.dataset else None
    with warnings.catch_warnings(record=True):  # the same text comes back in info["notes"], printed once
        return load_model(args.source, weights=args.weights, checkpoint=args.checkpoint, arch=args.arch,
                          num_classes=num_classes, arch_kwargs=args.arch_kwargs, device=device)


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
    from core.device import resolve_device
    from data import NUM_CLASSES
    from data.corruptions import CorruptedCifar
    from evaluation import (
        ResultStore,
        environment_info,
        load_eval_data,
        run_suite,
        sharding,
        summary_line,
        write_reports,
    )
    from evaluation.corruptions import CorruptionSection, run_corruptions
    from evaluation.inputs import points_identity
    from evaluation.sections import NormSection
    from evaluation.store import check_resume
    from evaluation.tracking import track_report
    from models import check_output

    # Without --norm the radii may be in the run's training norm (L1 up to 3072): they wait for it.
    suites, corruptions = _validate(args, radii_may_wait=_chosen_norms(args) is None)
    world = sharding.env_world_size()
    device = sharding.device_for(resolve_device(args.device), world)
    start = time.perf_counter()
    model, info = _load(args, device)
    config = info.get("config") or {}
    trained = config.get("norm")
    if suites is None or (_chosen_norms(args) is None and trained and trained != suites[0].norm):
        suites, corruptions = _validate(args, [trained or "Linf"])
    dataset = args.dataset or info.get("dataset") or config.get("dataset")
    if dataset is None:
        raise UserError("cannot tell which dataset this model was trained on: pass --dataset")
    data_dir = args.data_dir or config.get("data_dir") or "./datasets"
    corrupted = CorruptedCifar.open(dataset, data_dir, corruptions.corruptions) if corruptions else None
    x, y = load_eval_data(dataset, args.split, data_dir, args.n_ex)
    check_output(model, tuple(x.shape[1:]), NUM_CLASSES[dataset], info.get("arch") or "the model")
    data = {"dataset": dataset, "split": args.split, "n": len(y), "n_ex": args.n_ex, "data_dir": data_dir,
            "description": f"{dataset} {args.split} split, first {len(y)} points", "points": points_identity(x, y)}
    short = args.n_ex is not None and args.n_ex > len(y)
    if short:  # said in the summary line, report.json and report.md
        data["description"] = (f"{dataset} {args.split} split, all {len(y)} points (--n-ex {args.n_ex} asked for "
                               f"more than the split holds)")
    out = _default_out(args)
    sharding.check_world_size(len(y), suites[0].chunk_size, world)
    radii = _radii_list(suites)
    if args.resume:
        check_resume(out / "cache", radii, suites[0].chunk_size)
    # One evaluation writes into --out: rank 0 holds the lock (torchrun stops the others if it cannot).
    with _out_lock(out) if sharding.env_rank() == 0 else nullcontext():
        shard = sharding.start(device)
        try:
            store = ResultStore(out / "cache", _identity(info, data), resume=args.resume)
            if shard.is_main:
                store.write_manifest(radii, suites[0].chunk_size)
                _echo(args, suites, info, data, out)
            results = [run_suite(model, x, y, s, store=store, progress=not args.quiet, shard=shard,
                                 adv_dir=(out / "adv" / ("" if i == 0 else s.norm)) if args.save_adv else None)
                       for i, s in enumerate(suites)]
            if not shard.is_main:
                return 0
            sections = [NormSection(r) for r in results[1:]]
            if corrupted is not None:  # not sharded: rank 0 runs it once the suites are gathered
                sections.append(CorruptionSection(run_corruptions(model, corrupted, corruptions, store=store,
                                                                  progress=not args.quiet)))
            meta = {"model": dict(info), "data": data,
                    "environment": {**environment_info(device), "processes": shard.world_size},
                    "command": " ".join(["eval_autoattack.py"] + list(args.argv)), "out": str(out),
                    "wall_seconds": round(time.perf_counter() - start, 2)}
            paths = write_reports(results[0], out, meta, sections)
            track_report(args.tracker, out, paths["json"])
        finally:
            sharding.stop()
    lines = [f"{r.settings.norm}: {summary_line(r)}" if len(results) > 1 else summary_line(r) for r in results]
    lines += [s.summary() for s in sections if isinstance(s, CorruptionSection)]
    note = f" | --n-ex {args.n_ex} > the {len(y)} points of the split: all {len(y)} evaluated" if short else ""
    print(" || ".join(lines) + f"{note} | report: {paths['markdown']}")
    return 0


def _radii_list(suites) -> list:
    """The radii a resume must match: floats for the usual single L-inf suite, else ``NORM:radius`` texts."""
    from core.threat import eps_text

    if len(suites) == 1 and suites[0].norm == "Linf":
        return list(suites[0].eps)
    return [f"{s.norm}:{eps_text(e, s.norm)}" for s in suites for e in s.eps]


def _out_lock(out: Path):
    """One evaluation at a time writes into ``out`` (``OUT/.lock``, see ``core.files.folder_lock``)."""
    from core.files import folder_lock

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}; pick another --out") from None

    def busy(pid: Optional[int]) -> str:
        who = f"process {pid}" if pid else "another process"
        return (f"--out {out} is in use by another evaluation ({who} holds {out / '.lock'}): wait for it to "
                "end, or choose another --out")

    return folder_lock(out, busy)


def _echo(args: argparse.Namespace, suites, info: dict[str, Any], data: dict[str, Any], out: Path) -> None:
    from core.threat import eps_text

    for note in info.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if args.quiet:
        return
    radii = " ".join(f"{s.norm} eps {' '.join(eps_text(e, s.norm) for e in s.eps)}" for s in suites)
    print(f"model {info.get('source')} ({info.get('arch')}, weights {info.get('weights')}, epoch "
          f"{info.get('epoch')}) | {data['description']} | {radii} | attacks "
          f"{' '.join(a.name for a in suites[0].attacks)}{' corruptions' if _with_corruptions(args) else ''} "
          f"| seed {suites[0].seed} | out {out}", file=sys.stderr)


def _with_corruptions(args: argparse.Namespace) -> bool:
    from evaluation.corruptions import CORRUPTIONS_ATTACK

    return any(a.strip().lower() == CORRUPTIONS_ATTACK for a in args.attacks)


def _chosen_norms(args: argparse.Namespace) -> Optional[list[str]]:
    """``--norm``, else the norms that ``--eps NORM:RADIUS`` values name, else None (the run decides)."""
    if args.norm:
        return list(args.norm)
    if args.eps and all(":" in e for e in args.eps):
        return [e.split(":", 1)[0].strip() for e in args.eps]
    return None


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
