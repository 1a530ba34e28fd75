"""Any architecture: ``--arch MODULE:CALLABLE`` beside the registry's names.

``MODULE`` is an importable module (``timm``, ``robustbench.model_zoo.architectures.resnet``) or a
path to a ``.py`` file (``my_nets.py``, ``~/code/nets.py``); ``CALLABLE`` is a function or class in
it (``make``, ``ResNet18``, ``Nets.small``) that returns a ``torch.nn.Module`` taking images in
[0, 1], N x C x H x W, and returning logits N x K. ``--arch-kwargs JSON`` are its keyword
arguments; ``num_classes`` is added when the callable takes it and the JSON does not set it. A
run records the factory with the ``.py`` path made absolute, so ``--resume``, evaluation and
export find it again from anywhere. Every way a factory can fail (no such module or callable, an
import that raises, a call that raises, something that is not a module, outputs of the wrong
shape) is one ``UserError`` line.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Optional

import torch
import torch.nn as nn

from errors import UserError

SEPARATOR = ":"
FORM = "MODULE:CALLABLE (e.g. my_nets.py:make or robustbench.model_zoo.architectures.resnet:ResNet18)"


def is_factory(arch: str) -> bool:
    """True for ``MODULE:CALLABLE`` (registry names hold no colon)."""
    return SEPARATOR in str(arch)


def _parts(spec: str) -> tuple[str, str]:
    module, _, attr = str(spec).rpartition(SEPARATOR)
    if not module.strip() or not attr.strip():
        raise UserError(f"--arch {spec!r}: write {FORM}")
    return module.strip(), attr.strip()


def _is_path(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def canonical_factory(spec: str) -> str:
    """``spec`` with a ``.py`` path made absolute (how a run records it)."""
    module, attr = _parts(spec)
    if _is_path(module):
        module = str(Path(module).expanduser().resolve())
    return f"{module}{SEPARATOR}{attr}"


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names, its module imported (a ``.py`` path loaded as a module of its own)."""
    module_name, attr = _parts(spec)
    module = _import_file(module_name, spec) if _is_path(module_name) else _import_module(module_name, spec)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            raise UserError(f"--arch {spec}: {module_name} has no {attr!r}"
                            + (f"; it defines: {', '.join(found[:8])}" if found else ""))
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"--arch {spec}: {attr} is a {type(target).__name__}, not a function or class")
    return target


def _import_module(name: str, spec: str) -> Any:
    try:
        with warnings.catch_warnings():  # libraries' deprecation notices on import (robustbench's pkg_resources)
            for category in (DeprecationWarning, FutureWarning):
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("ignore", message=".*pkg_resources.*")
            return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise UserError(f"--arch {spec}: no module named {e.name!r} (install it, or pass the path of a .py "
                            f"file: {FORM})") from None
        raise UserError(f"--arch {spec}: importing {name} failed: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - a user's module may raise anything on import
        raise UserError(f"--arch {spec}: importing {name} failed: {_first_line(e)}") from None


def _import_file(module: str, spec: str) -> Any:
    path = Path(module).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"--arch {spec}: no file {path} (write {FORM})")
    stat = path.stat()
    digest = hashlib.sha1(f"{path}|{stat.st_mtime_ns}|{stat.st_size}".encode()).hexdigest()[:12]
    name = f"gkl_arch_{path.stem}_{digest}"  # one module per file version; a changed file is imported afresh
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserError(f"--arch {spec}: {path} cannot be imported as a Python module")
    loaded = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = loaded  # classes defined in it (dataclasses, pickling) look their module up here
    try:
        loader_spec.loader.exec_module(loaded)
    except Exception as e:  # noqa: BLE001 - a user's file may raise anything on import
        del sys.modules[name]
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        raise UserError(f"--arch {spec}: importing {path.name} failed{where}: {_first_line(e)}") from None
    return loaded


def parse_arch_kwargs(value: Any) -> dict[str, Any]:
    """``--arch-kwargs``: a JSON object (text) or a mapping; empty or None means no arguments."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, dict):
        parsed: Any = value
    else:
        try:
            parsed = json.loads(str(value))
        except json.JSONDecodeError as e:
            raise UserError(f"--arch-kwargs {value!r} is not JSON ({e.msg} at column {e.colno}): write an "
                            "object, e.g. '{\"width\": 64}'") from None
    if not isinstance(parsed, dict):
        raise UserError(f"--arch-kwargs {value!r} is a JSON {type(parsed).__name__}, not an object: write "
                        "'{\"name\": value, ...}'")
    return dict(parsed)


def arch_kwargs_text(value: Any) -> str:
    """The canonical text a run records for ``--arch-kwargs`` (keys sorted; empty for none)."""
    kwargs = parse_arch_kwargs(value)
    return json.dumps(kwargs, sort_keys=True) if kwargs else ""


def _takes(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def build_factory_model(spec: str, num_classes: Optional[int], kwargs: Any = None) -> nn.Module:
    """Call the factory ``spec`` with ``kwargs`` (plus ``num_classes`` when it takes it) and check the result."""
    factory = load_factory(spec)
    call = parse_arch_kwargs(kwargs)
    if num_classes is not None and "num_classes" not in call and _takes(factory, "num_classes"):
        call["num_classes"] = int(num_classes)
    try:
        model = factory(**call)
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        shown = json.dumps(call, default=str) if call else "no arguments"
        raise UserError(f"--arch {spec} raised {_first_line(e)} (called with {shown})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--arch {spec} returned a {type(model).__name__}, not a torch.nn.Module: the callable "
                        "must build and return the network")
    return model


def check_output(model: nn.Module, image_shape: tuple[int, ...], num_classes: int, arch: str) -> None:
    """Refuse a model that cannot classify images of ``image_shape`` (C, H, W) into ``num_classes`` logits.

    One forward of two black images in eval mode without gradients: no statistics change, no random draw.
    """
    param = next(iter(model.parameters()), None)
    probe = torch.zeros(2, *image_shape, device=param.device if param is not None else "cpu")
    shape = "x".join(str(d) for d in image_shape)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward
        raise UserError(f"{arch} cannot classify {shape} images: {_first_line(e)} (the data set's images are "
                        f"{shape}, C x H x W)") from None
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise UserError(f"{arch} returns {got} for a batch of 2 images of {shape}, but the data set has "
                        f"{num_classes} classes: it must return logits of shape (N, {num_classes}) (pass "
                        f"--arch-kwargs '{{\"num_classes\": {num_classes}}}' if its factory takes the count)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class ArchChoices(Collection[str]):
    """The names ``--arch`` accepts: every registry name, and any ``MODULE:CALLABLE``."""

    def __init__(self, registry: Collection[str]) -> None:
        self.registry = registry

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.registry or is_factory(name))

    def __iter__(self) -> Iterator[str]:
        return iter([*sorted(self.registry), "MODULE:CALLABLE"])

    def __len__(self) -> int:
        return len(self.registry) + 1
