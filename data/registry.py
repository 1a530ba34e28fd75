"""Name -> dataset registry: every data set a run trains or evaluates on is one entry here.

Fixed names (``digits``, ``cifar10``, ``cifar100``, ``svhn``, ``tiny-imagenet``) read their files
under ``--data-dir``; path kinds (``folder:PATH``, ``npz:PATH``) read a user's own data at PATH.
Every entry opens to a :class:`DatasetSource` (class count, image shape, the two splits), and
every split yields ``(image, label)`` with the torchvision CIFAR interface (``targets``; ``data``
as N x H x W x C uint8 where the images are held in memory). This module imports no torch: the
openers import what they need when called.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Optional, Protocol

from core.registry import Registry
from errors import UserError



class DatasetSource(Protocol):
    """An opened data set: what a run needs to know before it reads any batch, and its splits."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # C, H, W of every image a split yields

    def split(self, train: bool, transform: Optional[Callable] = None) -> Any:
        """The training (``train``) or test split as a torch ``Dataset`` with ``targets``."""


@dataclass(frozen=True)
class DatasetEntry:
    """One registered data set (a fixed name) or kind of data set (``folder``, ``npz``: given a PATH).

    ``open(location, download)`` returns a :class:`DatasetSource`; ``location`` is ``--data-dir``
    for a fixed name and PATH for a path kind. ``num_classes`` and ``image_size`` are known
    without reading files for fixed names (None for path kinds, which must open their files).
    """

    name: str
    summary: str
    open: Callable[[str, bool], DatasetSource]
    num_classes: Optional[int] = None
    image_size: Optional[tuple[int, int]] = None
    takes_path: bool = False


ENTRIES: Registry[DatasetEntry] = Registry("dataset")


def register(entry: DatasetEntry) -> DatasetEntry:
    """Add a data set (or, with ``takes_path``, a kind of data set named ``KIND:PATH``)."""
    return ENTRIES.add(entry.name, entry)


def split_name(name: str) -> tuple[DatasetEntry, Optional[str]]:
    """The entry of ``name`` and its PATH (``folder:PATH``), or a ``UserError`` listing the choices."""
    kind, sep, path = str(name).partition(":")
    entry = ENTRIES.get(kind)
    if entry is None or entry.takes_path != bool(sep):
        raise UserError(f"--dataset {name!r} is not one of: {', '.join(DATASETS)}")
    if sep and not path.strip():
        raise UserError(f"--dataset {name!r} names no path: write {kind}:PATH")
    return entry, (str(Path(path).expanduser()) if sep else None)


def canonical_name(name: str) -> str:
    """``name`` as a run records it: a path kind's PATH made absolute (so ``--resume`` works from anywhere)."""
    entry, path = split_name(name)
    return f"{entry.name}:{Path(path).resolve()}" if path is not None else entry.name


_OPENED: dict[tuple, DatasetSource] = {}


def open_dataset(name: str, data_dir: str = "./datasets", download: bool = False) -> DatasetSource:
    """Open ``name`` (a fixed name under ``data_dir``, or ``KIND:PATH``); path kinds are cached per file state."""
    entry, path = split_name(name)
    if path is None:
        return entry.open(str(Path(data_dir).expanduser()), download)
    key = (entry.name, str(Path(path).resolve()), _stat(Path(path)))  # resolved: the same text elsewhere differs
    if key not in _OPENED:
        _OPENED[key] = entry.open(path, download)
    return _OPENED[key]


def _stat(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_mtime_ns, st.st_size)


def build_dataset(name: str, train: bool, data_dir: str = "./datasets", download: bool = False,
                  transform: Optional[Callable] = None):
    """The training or test split of ``name`` with ``transform`` (default: plain to-tensor)."""
    from .transforms import eval_transform

    return open_dataset(name, data_dir, download).split(train, transform or eval_transform())


def num_classes_of(name: str) -> int:
    """Classes of ``name``: from the registry for fixed names, from the files for ``KIND:PATH``."""
    entry, _ = split_name(name)
    if entry.num_classes is not None:
        return entry.num_classes
    return open_dataset(name).num_classes


def image_shape_of(name: str, data_dir: str = "./datasets") -> tuple[int, int, int]:
    """C, H, W of ``name``'s images (fixed names: from the registry; others from their files)."""
    entry, _ = split_name(name)
    if entry.image_size is not None:
        return (3, *entry.image_size)
    return open_dataset(name, data_dir).image_shape


class DatasetChoices(Collection[str]):
    """The names ``--dataset`` accepts, a live view of :data:`ENTRIES`: the fixed names, and
    ``KIND:PATH`` for every path kind.

    Iterating lists them (argparse's ``choices`` and error messages show ``folder:PATH``);
    ``in`` accepts any ``KIND:PATH``, whose path is checked when it is opened.
    """

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        kind, sep, path = name.partition(":")
        entry = ENTRIES.get(kind)
        return entry is not None and entry.takes_path == bool(sep) and (not sep or bool(path.strip()))

    def __iter__(self) -> Iterator[str]:
        return iter([f"{e.name}:PATH" if e.takes_path else e.name for e in ENTRIES.values()])

    def __len__(self) -> int:
        return len(ENTRIES)

    def __repr__(self) -> str:
        return repr(tuple(self))


class _ClassCounts(Mapping[str, int]):
    """``NUM_CLASSES[name]`` for any ``--dataset`` name; iterating lists the fixed names."""

    def __getitem__(self, name: str) -> int:
        if name not in DATASETS:
            raise KeyError(name)
        return num_classes_of(name)

    def __contains__(self, name: object) -> bool:
        return name in DATASETS

    def __iter__(self) -> Iterator[str]:
        return iter([e.name for e in ENTRIES.values() if not e.takes_path])

    def __len__(self) -> int:
        return sum(not e.takes_path for e in ENTRIES.values())


DATASETS = DatasetChoices()
NUM_CLASSES: Mapping[str, int] = _ClassCounts()


# ------------------------------------------------------------------------------------- the entries
def _lazy(module: str, function: str, *args: Any) -> Callable[[str, bool], DatasetSource]:
    """An opener that imports ``module`` (torch, torchvision) only when a data set is opened."""

    def opener(location: str, download: bool) -> DatasetSource:
        import importlib

        return getattr(importlib.import_module(module, __package__), function)(*args, location, download)

    return opener


register(DatasetEntry("digits", "scikit-learn's bundled digits, 32x32 RGB (embedded, no download)",
                      _lazy(".digits", "open_digits"), 10, (32, 32)))
register(DatasetEntry("cifar10", "CIFAR-10 (python version) under --data-dir", _lazy(".cifar", "open_cifar", "cifar10"),
                      10, (32, 32)))
register(DatasetEntry("cifar100", "CIFAR-100 (python version) under --data-dir",
                      _lazy(".cifar", "open_cifar", "cifar100"), 100, (32, 32)))
register(DatasetEntry("svhn", "SVHN train_32x32.mat / test_32x32.mat under --data-dir[/svhn]",
                      _lazy(".svhn", "open_svhn"), 10, (32, 32)))
register(DatasetEntry("tiny-imagenet", "Tiny-ImageNet-200 (64x64; val is the test split) under --data-dir",
                      _lazy(".folders", "open_tiny_imagenet"), 200, (64, 64)))
register(DatasetEntry("folder", "your images: PATH/train/<class>/* and PATH/test/<class>/*",
                      _lazy(".folders", "open_folder"), takes_path=True))
register(DatasetEntry("npz", "your arrays: x_train, y_train, x_test, y_test (uint8 NHWC, int labels)",
                      _lazy(".npz", "open_npz"), takes_path=True))
