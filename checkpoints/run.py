"""Loading side of run folders and checkpoints: one call from a path (or zoo name) to an eval-mode model.

Accepted sources:
- a run folder (``RUN/checkpoints/{last,best,epoch_NNNN}.pt`` plus ``RUN/config.yaml``);
- a project checkpoint file (a dict with ``"format": "gkl-at/1"``);
- a plain state dict (``.pt``, ``.safetensors``; wrapped or prefixed as other code bases save them,
  :mod:`checkpoints.weights`), which needs the architecture (a registry name or ``MODULE:CALLABLE``)
  and class count;
- a RobustBench model-zoo name, loaded through robustbench itself (:func:`load_robustbench_model`).

Every user-caused problem (missing file, wrong architecture, wrong class count) is a ``UserError``.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from errors import UserError

from .weights import fit_state_dict, read_weights, state_dict_mismatch, unwrap_state_dict  # noqa: F401 (API)

FORMAT_PREFIX = "gkl-at/"
SUPPORTED_FORMATS = ("gkl-at/1",)
WEIGHTS = ("avg", "raw")
CHECKPOINT_NAMES = ("last", "best")


def resolve_checkpoint(run_dir: str | os.PathLike, checkpoint: str = "last") -> Path:
    """Path of ``checkpoint`` (``last``, ``best``, ``epoch_0005`` or a file name) inside a run folder."""
    folder = Path(run_dir) / "checkpoints"
    name = checkpoint if checkpoint.endswith(".pt") else f"{checkpoint}.pt"
    path = folder / name
    if path.is_file():
        return path
    found = sorted(p.stem for p in folder.glob("*.pt")) if folder.is_dir() else []
    if not found:
        raise UserError(f"{run_dir} has no checkpoints/ with .pt files: is it a run folder? "
                        "(pass a run folder, a .pt checkpoint or --robustbench-model NAME)")
    raise UserError(f"run folder {run_dir} has no checkpoint {checkpoint!r}; "
                    f"choose --checkpoint from: {', '.join(found)}")


def read_run_config(run_dir: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The resolved training config saved in ``RUN/config.yaml``, or None when absent."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]} (fix or remove the file)") from None


def load_model(source: str | os.PathLike, *, weights: str = "avg", checkpoint: str = "last",
               arch: Optional[str] = None, num_classes: Optional[int] = None, arch_kwargs: Any = None,
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Build the model stored at ``source`` and return ``(model in eval mode on device, info)``.

    ``weights="avg"`` takes the averaged weights of a project checkpoint (falling back to the raw
    ones, with a warning, when the run kept none). ``arch``/``num_classes`` (and ``arch_kwargs``
    for a factory) are required for a plain state dict (:mod:`checkpoints.weights` reads its usual
    shapes); for project checkpoints they are checked against what the file says, except that
    ``arch`` may say where a run's ``MODULE:CALLABLE`` factory is now. ``info`` holds: source, kind,
    path, arch, arch_kwargs, dataset, num_classes, epoch, global_step, weights, config, notes.
    """
    if weights not in WEIGHTS:
        raise UserError(f"--weights {weights!r} is not one of: {', '.join(WEIGHTS)}")
    src = Path(source)
    if src.is_dir():
        path = resolve_checkpoint(src, checkpoint)
        state, kind = read_weights(path), "run"
    elif src.is_file():
        path, kind = src, "checkpoint"
        state = read_weights(path)
    else:
        raise UserError(f"model source not found: {source} (pass a run folder, a .pt file, "
                        "or --robustbench-model NAME)")
    if isinstance(state, Mapping) and "format" in state:
        model, info = _from_project_checkpoint(state, path, weights, arch, num_classes, arch_kwargs)
        if kind == "run":
            info["config"] = info["config"] or read_run_config(src)
    else:
        model, info = _from_state_dict(state, path, arch, num_classes, arch_kwargs)
    if info["kind"] == "checkpoint":
        info["kind"] = kind
    info.update(source=str(source), path=str(path))
    return model.to(device).eval(), info


def _from_project_checkpoint(state: Mapping[str, Any], path: Path, weights: str, arch: Optional[str],
                             num_classes: Optional[int], arch_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    from models import is_factory

    fmt = state.get("format")
    if fmt not in SUPPORTED_FORMATS:
        raise UserError(f"{path} has checkpoint format {fmt!r}, this code reads {', '.join(SUPPORTED_FORMATS)} "
                        "(evaluate it with the code version that wrote it)")
    ck_arch, ck_classes = state.get("arch"), state.get("num_classes")
    lacking = [k for k, ok in (("model", isinstance(state.get("model"), Mapping)), ("arch", isinstance(ck_arch, str)),
                               ("num_classes", isinstance(ck_classes, int))) if not ok]
    if state.get("avg_model") is not None and not isinstance(state["avg_model"], Mapping):
        lacking.append("avg_model")
    if lacking:
        raise UserError(f"{path} says it is a {fmt} checkpoint but has no valid {', '.join(lacking)}: it is damaged "
                        "or was not written by train_at.py (a plain state dict loads with --arch and --dataset)")
    config = dict(state["config"]) if isinstance(state.get("config"), Mapping) else None
    if arch_kwargs is None:
        arch_kwargs = (config or {}).get("arch_kwargs")
    if arch is not None and is_factory(arch) and is_factory(ck_arch):
        ck_arch = arch  # the run's factory has moved: the weights still load strictly, or not at all
    elif arch is not None and arch != ck_arch:
        raise UserError(f"--arch {arch} differs from the checkpoint's architecture {ck_arch} in {path}; "
                        "drop --arch to use the checkpoint's")
    if num_classes is not None and ck_classes is not None and int(num_classes) != int(ck_classes):
        raise UserError(f"{path} is a {ck_classes}-class model ({state.get('dataset')}), but the chosen "
                        f"dataset has {num_classes} classes; pass --dataset {state.get('dataset')}")
    notes: list[str] = []
    chosen = "raw"
    sd = state["model"]
    if weights == "avg":
        if state.get("avg_model") is not None:
            sd, chosen = state["avg_model"], "avg"
        else:
            note = f"{path.name} has no averaged weights (averaging off or not started): using the raw weights"
            warnings.warn(note, stacklevel=3)
            notes.append(note)
    model = _build_and_load(ck_arch, int(ck_classes), sd, path, arch_kwargs)
    info = {"kind": "checkpoint", "arch": ck_arch, "arch_kwargs": arch_kwargs or None, "dataset": state.get("dataset"),
            "num_classes": int(ck_classes), "epoch": state.get("epoch"),
            "global_step": state.get("global_step"), "weights": chosen, "config": config or None, "notes": notes}
    return model, info


def _from_state_dict(state: Any, path: Path, arch: Optional[str], num_classes: Optional[int],
                     arch_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    sd = unwrap_state_dict(state, path)
    if arch is None or num_classes is None:
        raise UserError(f"{path} is a plain state dict without architecture information: pass --arch "
                        "(e.g. wrn-34-10, or MODULE:CALLABLE) and --dataset (for the number of classes)")
    model = _build_and_load(arch, int(num_classes), sd, path, arch_kwargs)
    info = {"kind": "state_dict", "arch": arch, "arch_kwargs": arch_kwargs or None, "dataset": None,
            "num_classes": int(num_classes),
            "epoch": None, "global_step": None, "weights": "state_dict", "config": None, "notes": []}
    return model, info


def _build_and_load(arch: str, num_classes: Optional[int], sd: Mapping[str, torch.Tensor], path: Path,
                    arch_kwargs: Any = None) -> nn.Module:
    """Build ``arch`` (a registry name or ``MODULE:CALLABLE``) and load ``sd`` into it strictly."""
    from models import MODELS, build_model, is_factory, parse_arch_kwargs

    if not is_factory(arch) and arch not in MODELS:
        raise UserError(f"unknown architecture {arch!r} for {path}; choose --arch from: "
                        f"{', '.join(sorted(MODELS))}, or MODULE:CALLABLE")
    model = build_model(arch, num_classes=num_classes, **parse_arch_kwargs(arch_kwargs))
    classes = f" with {num_classes} classes" if num_classes is not None else ""
    fitted = fit_state_dict(model, dict(sd), f"{path} does not load strictly into {arch}{classes}")
    model.load_state_dict(fitted, strict=True)
    return model


def load_robustbench_model(name: str, *, model_dir: str | os.PathLike = "./models", dataset: str = "cifar10",
                           threat_model: str = "Linf",
                           device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a RobustBench model-zoo entry through ``robustbench.utils.load_model``.

    Without internet the weights must already be at ``MODEL_DIR/DATASET/THREAT/NAME.pt``.
    """
    from attacks import rb_bridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation noise from robustbench's imports (timm, torch.jit)
        rb_bridge.install()
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import load_model as rb_load_model

    try:
        ds, tm = BenchmarkDataset(dataset), ThreatModel(threat_model)
    except ValueError:
        raise UserError(f"RobustBench has no dataset/threat model {dataset}/{threat_model}: use cifar10 or "
                        "cifar100 with Linf or L2") from None
    if name not in model_dicts[ds][tm]:
        raise UserError(f"RobustBench has no model {name!r} for {dataset} {threat_model}; see its "
                        "leaderboard for the names")
    path = Path(model_dir) / ds.value / tm.value / f"{name}.pt"
    created = [d for d in (path.parent.parent.parent, path.parent.parent, path.parent) if not d.exists()]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            model = rb_load_model(name, model_dir=str(model_dir), dataset=ds, threat_model=tm)
    except Exception as e:  # noqa: BLE001 - the downloader raises many kinds when offline
        for folder in reversed(created):  # leave no empty folders behind from the failed download
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        if path.is_file():
            raise UserError(f"robustbench could not load {path}: {str(e).splitlines()[0][:200]}") from None
        raise UserError(f"RobustBench model {name} is not in {path} and could not be downloaded "
                        f"({type(e).__name__}); download it on a connected machine into --model-dir") from None
    info = {"kind": "robustbench", "source": name, "path": str(path), "arch": type(model).__name__,
            "dataset": dataset, "num_classes": {"cifar10": 10, "cifar100": 100}.get(dataset), "epoch": None, "global_step": None,
            "weights": "robustbench", "config": None, "notes": []}
    return model.to(device).eval(), info


def run_folder_of(source: str | os.PathLike) -> Optional[Path]:
    """The run folder ``source`` is, or holds the checkpoint ``source`` (``RUN/checkpoints/x.pt``); else None."""
    src = Path(source)
    if src.is_dir():
        return src
    if src.parent.name == "checkpoints" and (src.parent.parent / "config.yaml").is_file():
        return src.parent.parent
    return None


def default_out_dir(source: str | os.PathLike, name: str) -> Path:
    """Where a tool writes its output for ``source`` by default: ``RUN/NAME`` inside a run folder,
    else ``NAME_<stem>`` beside a checkpoint file."""
    run = run_folder_of(source)
    src = Path(source)
    return run / name if run is not None else src.parent / f"{name}_{src.stem}"
