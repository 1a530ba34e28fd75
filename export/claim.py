"""The claim: RobustBench's own ``benchmark`` (standard AutoAttack) run on the exported file, offline."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from core.provenance import now_iso, package_versions
from core.threat import eps_text
from errors import UserError

from .arch import RobustBenchArch, install_robustbench
from .model_info import pct
from .weights import file_sha256, load_into_robustbench

RB_DATASETS = ("cifar10", "cifar100")
FULL_TEST_SET = 10_000  # RobustBench evaluates CIFAR-10/100 models on the whole test set


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


def run_claim(arch: RobustBenchArch, weights: str | os.PathLike, *, dataset: str, data_root: Path,
              norm: str, eps: float, n_examples: int = FULL_TEST_SET, batch_size: int = 256,
              device: torch.device | str = "cpu", work_dir: str | os.PathLike = ".") -> dict[str, Any]:
    """``robustbench.eval.benchmark`` (standard AutoAttack) on the exported file in RobustBench's class.

    Runs without an AutoAttack state file: robustbench 1.1.1 then computes the robust accuracy
    from the returned adversarial examples, whereas with a state file it calls ``mean()`` on the
    state's boolean flags, which PyTorch refuses. The AutoAttack log goes to ``work_dir``.
    Returns the claim as JSON-ready data.
    """
    from attacks import rb_bridge

    model = load_into_robustbench(arch, weights)
    install_robustbench()
    from robustbench.eval import benchmark

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sha = file_sha256(weights)
    log_path = work / "claim_autoattack.log"
    start = time.perf_counter()
    clean, robust = benchmark(model, n_examples=n_examples, dataset=dataset, threat_model=norm,
                              data_dir=str(data_root), device=torch.device(device), batch_size=batch_size,
                              eps=eps, log_path=str(log_path))
    return {"dataset": dataset, "threat_model": norm, "eps": eps_text(eps, norm), "n_examples": n_examples,
            "clean_acc": pct(clean), "autoattack_acc": pct(robust), "clean_accuracy": clean,
            "autoattack_accuracy": robust, "constructor": arch.call_source(), "weights": str(weights),
            "weights_sha256": sha, "autoattack": "git autoattack" if rb_bridge.uses_git_autoattack()
            else "pyautoattack through attacks.rb_bridge", "versions": package_versions(("robustbench", "pyautoattack", "torch")), "device": str(device),
            "seconds": round(time.perf_counter() - start, 2), "autoattack_log": str(log_path),
            "created": now_iso()}
