"""The claim: RobustBench's own ``benchmark`` run on the exported file, offline, for each board.

Linf / L2: standard AutoAttack on the CIFAR test set. Corruptions: the mean accuracy over the 15
corruptions x 5 severities of CIFAR-10-C / CIFAR-100-C, read by RobustBench's own loader from the
``-C`` folder in ``--data-dir``; every file is checked first, so the loader never tries to download.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from core.provenance import now_iso, package_versions
from core.threat import eps_text
from errors import UserError

from .arch import RobustBenchArch, install_robustbench
from .boards import CORRUPTIONS_BOARD
from .model_info import pct
from .roundtrip import load_as_maintainer, read_zoo_entry, weights_path
from .weights import file_sha256

RB_DATASETS = ("cifar10", "cifar100")
FULL_TEST_SET = 10_000  # RobustBench evaluates CIFAR-10/100 models on the whole test set
RB_IMAGES_PER_SEVERITY = 10_000  # robustbench.data.load_corruptions_cifar slices its files in blocks of this size


def claim_data_root(dataset: str, data_dir: str | os.PathLike) -> tuple[Path, int]:
    """Folder to give RobustBench's loader for the local test set, and the set's size.

    The files are checked here (MD5 included, no download), so RobustBench's own loader, which
    asks torchvision to download, finds them verified and never goes online.
    """
    if dataset not in RB_DATASETS:
        raise UserError(f"--claim needs a RobustBench dataset ({', '.join(RB_DATASETS)}), this model is {dataset}")
    from data.cifar import cifar_dataset

    test = cifar_dataset(dataset, train=False, data_dir=data_dir, download=False)
    return Path(test.root), len(test)


def claim_corruptions_root(dataset: str, data_dir: str | os.PathLike) -> Path:
    """The folder holding ``CIFAR-10-C/`` (or ``CIFAR-100-C/``) with every file RobustBench's benchmark
    reads, checked (names, shapes, 10,000 images per severity); RobustBench downloads when the folder is
    missing, so a missing or short file is a ``UserError`` here instead."""
    from data.corruptions import CorruptedCifar, fetch_hint

    install_robustbench()
    from robustbench.data import CORRUPTIONS_DICT
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    names = CORRUPTIONS_DICT[BenchmarkDataset(dataset)][ThreatModel.corruptions]
    data = CorruptedCifar.open(dataset, data_dir, names)
    if data.per_severity != RB_IMAGES_PER_SEVERITY:
        raise UserError(f"{data.folder} holds {data.per_severity} images per severity; RobustBench's loader reads "
                        f"blocks of {RB_IMAGES_PER_SEVERITY}: {fetch_hint(dataset, data.folder)}")
    return data.folder.parent


def run_claim(arch: RobustBenchArch, zoo_entry: str | os.PathLike, model_dir: str | os.PathLike, *, dataset: str,
              data_root: Path, norm: str, eps: Optional[float], n_examples: int = FULL_TEST_SET,
              batch_size: int = 256, device: torch.device | str = "cpu", work_dir: str | os.PathLike = ".",
              corruptions_root: Optional[Path] = None) -> dict[str, Any]:
    """``robustbench.eval.benchmark`` for board ``norm`` on the model a maintainer gets: the entry of
    ``zoo_entry`` loaded by ``robustbench.utils.load_model`` from ``model_dir`` (``export.roundtrip``).

    Linf / L2 run without an AutoAttack state file: robustbench 1.1.1 then computes the robust
    accuracy from the returned adversarial examples, whereas with a state file it calls ``mean()``
    on the state's boolean flags, which PyTorch refuses. The AutoAttack log goes to ``work_dir``.
    ``corruptions`` needs ``corruptions_root`` (from :func:`claim_corruptions_root`). Returns the
    claim as JSON-ready data.
    """
    from attacks import rb_bridge

    model = load_as_maintainer(zoo_entry, model_dir, dataset, norm)
    weights = weights_path(model_dir, read_zoo_entry(zoo_entry)[0], dataset, norm)
    install_robustbench()
    from robustbench.eval import benchmark

    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(weights)
    start = time.perf_counter()
    common = dict(n_examples=n_examples, dataset=dataset, data_dir=str(Path(data_root).resolve()),
                  device=torch.device(device), batch_size=batch_size)
    if norm == CORRUPTIONS_BOARD:
        if corruptions_root is None:
            raise ValueError("the corruptions claim needs corruptions_root")
        with _mce_baseline_folder(dataset), _cifar_loader_takes_prepr(dataset):
            clean, robust = benchmark(model, threat_model=norm, corruptions_data_dir=str(corruptions_root.resolve()),
                                      **common)
        figures = {"corruptions_acc": pct(robust), "corruptions_accuracy": robust,
                   "corruptions_data": str(corruptions_root)}
    else:
        log_path = work / f"claim_autoattack_{norm}.log"
        clean, robust = benchmark(model, threat_model=norm, eps=eps, log_path=str(log_path), **common)
        implementation = rb_bridge.autoattack_implementation()
        figures = {"autoattack_acc": pct(robust), "autoattack_accuracy": robust, "autoattack_log": str(log_path),
                   "autoattack": implementation["summary"], "autoattack_implementation": implementation}
    return {"dataset": dataset, "threat_model": norm, "eps": None if eps is None else eps_text(eps, norm),
            "n_examples": n_examples, "clean_acc": pct(clean), "clean_accuracy": clean, **figures,
            "constructor": arch.call_source(), "loader": "robustbench.utils.load_model", "weights": str(weights),
            "weights_sha256": sha,
            "versions": package_versions(("robustbench", "pyautoattack", "torch")), "device": str(device),
            "seconds": round(time.perf_counter() - start, 2), "created": now_iso()}


@contextlib.contextmanager
def _cifar_loader_takes_prepr(dataset: str):
    """robustbench 1.1.1 calls its CIFAR-C loaders with ``prepr=``, a keyword they do not take (their
    last parameter is ``_``): wrap the loader for the claim; CIFAR images need no preprocessing anyway."""
    from robustbench.data import CORRUPTION_DATASET_LOADERS
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    loaders = CORRUPTION_DATASET_LOADERS[BenchmarkDataset(dataset)]
    original = loaders[ThreatModel.corruptions]

    def loader(n_examples, severity, data_dir, shuffle=False, corruptions=(), prepr=None):
        return original(n_examples, severity, data_dir, shuffle, corruptions)

    loaders[ThreatModel.corruptions] = loader
    try:
        yield
    finally:
        loaders[ThreatModel.corruptions] = original


@contextlib.contextmanager
def _mce_baseline_folder(dataset: str):
    """Run inside a scratch folder holding ``model_info/<dataset>/corruptions/unaggregated_results.csv``.

    robustbench 1.1.1's corruptions benchmark reads that file from the working directory for an
    ``AlexNet`` row (the mCE baseline) and fails without one. The mCE it computes from it is not
    returned by ``benchmark`` nor part of a CIFAR model_info, so the row here holds placeholder
    values (1.0 would divide by zero; 0.5 everywhere): the claim's accuracies do not depend on it.
    """
    from data.corruptions import CORRUPTIONS, SEVERITIES

    header = ["," + ",".join(c for c in CORRUPTIONS for _ in SEVERITIES),
              "," + ",".join(str(s) for _ in CORRUPTIONS for s in SEVERITIES),
              "AlexNet," + ",".join("0.5" for _ in range(len(CORRUPTIONS) * len(SEVERITIES)))]
    with tempfile.TemporaryDirectory(prefix="gkl-claim-") as scratch:
        target = Path(scratch) / "model_info" / dataset / CORRUPTIONS_BOARD / "unaggregated_results.csv"
        target.parent.mkdir(parents=True)
        target.write_text("\n".join(header) + "\n")
        with contextlib.chdir(scratch):
            yield
