"""Generated data for the DM-AT recipe: a dataset over converted shards and a mixing sampler.

``GeneratedDataset`` reads the ``.npy`` shards written by ``data/convert_generated.py`` through
read-only memory maps, so a 50M-image set (150 GB) costs no RAM beyond the pages the loader
touches. ``MixedBatchSampler`` puts exactly ``round(fraction * global_batch)`` generated images
into every global batch over ``ConcatDataset([real, generated])``:

* real part: a fresh permutation of the real set per epoch, seeded by ``(seed, epoch)`` exactly
  as ``EpochBatchSampler`` does (with ``fraction=0`` both yield the same batches); an epoch
  longer than one pass over the real set draws further permutations;
* generated part: drawn without replacement *across* epochs. The generated stream is one long
  sequence of positions; cycle ``c`` covers positions ``[c*N, (c+1)*N)`` and maps them through
  its own keyed pseudo-random permutation of ``range(N)``. So every generated image is used
  once before any is used twice, whatever the epoch length, and position ``p`` of any step is
  computed in O(1) memory (no 50M-entry permutation per rank) for any ``(epoch, step)``, which
  is what resume needs. DM-AT itself draws generated images with replacement.

Each rank takes a part of every global batch with (as nearly as divisibility allows) the same
real/generated mix, so per-rank BatchNorm statistics see the same mixture; the union over
ranks is the 1-process global batch, with the same per-sample seeds, for any world size.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from errors import UserError

from .convert_generated import IMAGE_SHAPE, INDEX_FORMAT, INDEX_NAME, INDEX_VERSION, LABEL_DTYPE
from .sampler import epoch_seed, rank_part

PathLike = Union[str, os.PathLike]
_CONVERT_HINT = "convert the .npz files with `python data/convert_generated.py IN.npz OUT_DIR`"


# ---------------------------------------------------------------------------------------------
# Dataset


def _index_problem(index: object) -> Optional[str]:
    """What is wrong with a parsed index, or None."""
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        return "unknown format"
    if index.get("version") != INDEX_VERSION:
        return f"version {index.get('version')}, expected {INDEX_VERSION}"
    shards = index.get("shards")
    if not isinstance(shards, list) or not shards:
        return "no shards"
    if not all(isinstance(s, dict) and {"images", "labels", "count"} <= s.keys() for s in shards):
        return "a shard entry lacks images/labels/count"
    if not isinstance(index.get("num_classes"), int) or index["num_classes"] < 1:
        return f"num_classes {index.get('num_classes')!r}"
    total = sum(int(s["count"]) for s in shards)
    if total != index.get("count"):
        return f"shard counts add up to {total}, not {index.get('count')}"
    return None


def read_index(folder: PathLike) -> dict:
    """Read and check ``folder/index.json`` written by the converter."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"generated-data folder {folder} does not exist or is not a folder; {_CONVERT_HINT}")
    path = folder / INDEX_NAME
    if not path.is_file():
        raise UserError(f"{folder} has no {INDEX_NAME}, so it is not a converted shard folder; {_CONVERT_HINT}")
    try:
        index = json.loads(path.read_text())
        problem = _index_problem(index)
    except (ValueError, TypeError) as exc:
        index, problem = None, f"unreadable: {exc}"
    if problem:
        raise UserError(f"{path} is not a valid shard index ({problem}); {_CONVERT_HINT}")
    return index


def _open_shard(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"shard {path} is missing; copy the whole folder again or re-convert")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise UserError(f"shard {path} is unreadable ({exc}); re-convert the folder") from None
    if arr.shape != shape or arr.dtype != dtype:
        raise UserError(f"shard {path} holds {arr.shape} {arr.dtype} but index.json says {shape} {dtype}; "
                        "the folder is damaged: re-convert it")
    return arr


_LABEL_CHUNK = 1 << 22  # labels checked at a time (32 MB): 50M labels take a fraction of a second
_HASH_BLOCK = 1 << 24


def _label_counts(labels: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """Per-class counts of a label shard; ``UserError`` naming the first label outside the classes."""
    counts = np.zeros(num_classes, np.int64)
    for start in range(0, len(labels), _LABEL_CHUNK):
        chunk = labels[start:start + _LABEL_CHUNK]
        if len(chunk) and (chunk.min() < 0 or chunk.max() >= num_classes):
            i = int(np.flatnonzero((chunk < 0) | (chunk >= num_classes))[0])
            raise UserError(f"shard {path} holds label {chunk[i]} at position {start + i}, outside the "
                            f"{num_classes} classes of index.json: the folder is damaged or was converted for "
                            "another dataset; re-convert it (with --num-classes)")
        counts += np.bincount(chunk, minlength=num_classes)
    return counts


def verify_shards(folder: PathLike, progress: bool = True) -> None:
    """Check every shard file's size and SHA-256 against ``index.json`` (reads the whole set once)."""
    folder = Path(folder)
    index = read_index(folder)
    files = [(s[kind], s.get(f"{kind}_sha256"), s.get(f"{kind}_bytes"))
             for s in index["shards"] for kind in ("images", "labels")]
    if any(digest is None for _, digest, _ in files):
        raise UserError(f"{folder / INDEX_NAME} has no SHA-256 digests to verify (an older converter wrote it); "
                        "re-convert the folder, or train without --verify-generated")
    total = sum(int(size or 0) for _, _, size in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="verifying shards", disable=not progress,
              leave=False) as bar:
        for name, digest, size in files:
            path = folder / name
            if not path.is_file() or (size is not None and path.stat().st_size != int(size)):
                found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
                raise UserError(f"shard {path} is {found}, index.json says {size} bytes: copy the folder again "
                                "or re-convert it")
            sha = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(_HASH_BLOCK):
                    sha.update(block)
                    bar.update(len(block))
            if sha.hexdigest() != digest:
                raise UserError(f"shard {path} does not match its SHA-256 in index.json: the file is damaged; "
                                "copy the folder again or re-convert it")


class GeneratedDataset(Dataset):
    """Images and labels of a converted generated-data folder, read through memory maps.

    Items are ``(transform(PIL image), int label)`` like torchvision's CIFAR datasets (the PIL
    image itself when ``transform`` is None). There is no ``data``/``targets`` in RAM by design.
    """

    def __init__(self, folder: PathLike, transform: Optional[Callable] = None) -> None:
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.transform = transform
        self.num_classes = int(self.index["num_classes"])
        self.class_counts = list(self.index.get("class_counts", []))
        self._ends = np.cumsum([int(s["count"]) for s in self.index["shards"]])
        self._arrays: Optional[list[tuple[np.ndarray, np.ndarray]]] = None
        self._check_labels()  # open every shard now so that a damaged folder fails here, not mid-epoch

    def _check_labels(self) -> None:
        """Every label is a class of the index, and the per-class counts are the index's (when it has them)."""
        counts = sum(_label_counts(labels, self.num_classes, self.folder / s["labels"])
                     for (_, labels), s in zip(self._shards(), self.index["shards"]))
        expected = self.class_counts
        if len(expected) == self.num_classes and list(counts) != [int(c) for c in expected]:
            k = next(i for i, (a, b) in enumerate(zip(counts, expected)) if a != int(b))
            raise UserError(f"the labels in {self.folder} differ from its index.json (class {k}: {counts[k]} images, "
                            f"the index says {expected[k]}): the folder is damaged; re-convert it")

    def _shards(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._arrays is None:
            self._arrays = [
                (_open_shard(self.folder / s["images"], (int(s["count"]), *IMAGE_SHAPE), np.dtype(np.uint8)),
                 _open_shard(self.folder / s["labels"], (int(s["count"]),), LABEL_DTYPE))
                for s in self.index["shards"]]
        return self._arrays

    def __getstate__(self) -> dict:
        # maps are reopened in each worker; pickling a memmap would copy the whole array
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __getitem__(self, i: int):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} generated images")
        i %= n
        k = int(np.searchsorted(self._ends, i, side="right"))
        j = i - (int(self._ends[k - 1]) if k else 0)
        images, labels = self._shards()[k]
        img = Image.fromarray(np.array(images[j]))  # a copy, so the item does not pin the mapping
        if self.transform is not None:
            img = self.transform(img)
        return img, int(labels[j])


# ---------------------------------------------------------------------------------------------
# Keyed pseudo-random permutation (O(1) memory, random access)

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_FEISTEL_ROUNDS = 4


def _mix_int(x: int) -> int:
    """splitmix64 finalizer on a Python int (the same function as ``_mix64``)."""
    x &= _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (multiplication wraps modulo 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class KeyedPermutation:
    """A pseudo-random bijection of ``range(n)`` chosen by ``key``, evaluated elementwise.

    A balanced Feistel network permutes ``range(4**h)`` (the smallest such range holding ``n``);
    values that land outside ``range(n)`` are mapped again until they fall inside (cycle
    walking), which keeps it a bijection of ``range(n)``.
    """

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"cannot permute {n} elements")
        self.n = n
        self.half = max(1, -(-max(1, (n - 1).bit_length()) // 2))
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(_mix_int(key + r * _GOLDEN)) for r in range(_FEISTEL_ROUNDS)]

    def _rounds(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << shift) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        """Images of the positions ``i`` (integers in ``[0, n)``) as int64."""
        y = self._rounds(np.asarray(i, dtype=np.uint64))
        outside = y >= np.uint64(self.n)
        while outside.any():
            y[outside] = self._rounds(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Mixed batch sampler


class MixedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's part of each global batch as ``[(index, sample_seed), ...]``.

    Indices refer to ``ConcatDataset([real, generated])``: generated ones are offset by
    ``n_real``. Every global batch holds ``round(fraction * global_batch)`` generated images.
    One epoch is ``steps_per_epoch`` batches, by default one pass over the real set:
    ``n_real // real_per_batch`` full real parts, plus (unless ``drop_last``) a last step with the
    remaining real images and the usual generated part. DM-AT's epoch is shorter:
    ``ceil(50000 / global_batch)`` steps whatever the mix (pass ``steps_per_epoch``; such an epoch
    draws full real parts only). Same interface as ``EpochBatchSampler``: call
    ``set_epoch(epoch, start_step)`` (epochs count from 1) before iterating.
    """

    def __init__(self, n_real: int, n_generated: int, global_batch: int, fraction: float, seed: int = 0,
                 rank: int = 0, world_size: int = 1, steps_per_epoch: Optional[int] = None,
                 drop_last: bool = True) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"--generated-fraction {fraction} must be between 0 and 1")
        if global_batch < 1 or global_batch % world_size:
            raise UserError(f"global batch {global_batch} is not a positive multiple of the world size "
                            f"{world_size}; choose a batch size divisible by the number of processes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.n_real, self.n_generated, self.global_batch = n_real, n_generated, global_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.generated_per_batch = round(fraction * global_batch)
        self.real_per_batch = global_batch - self.generated_per_batch
        self._check_sizes(fraction)
        keep_tail = not drop_last and steps_per_epoch is None and self.real_per_batch > 0
        self._tail = n_real % self.real_per_batch if keep_tail else 0  # real images of the last step
        self._steps = self._default_steps() if steps_per_epoch is None else steps_per_epoch
        if self._steps < 1:
            raise UserError(f"steps per epoch {self._steps} must be at least 1")
        self.epoch, self.start_step = 1, 0

    def _check_sizes(self, fraction: float) -> None:
        if self.generated_per_batch and self.n_generated < 1:
            raise UserError(f"--generated-fraction {fraction} needs generated images but the generated set "
                            "is empty; pass --generated FOLDER or set the fraction to 0")
        if self.real_per_batch > self.n_real:
            raise UserError(f"the real part of each batch ({self.real_per_batch} images) is larger than the "
                            f"real set ({self.n_real}); lower the batch size or raise --generated-fraction")

    def _default_steps(self) -> int:
        if self.real_per_batch:
            return self.n_real // self.real_per_batch + (self._tail > 0)
        return max(1, self.n_generated // self.global_batch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (from 1) and the step within it to start from (resume)."""
        if epoch < 1:
            raise ValueError(f"epochs count from 1, got {epoch}")
        if not 0 <= start_step <= self._steps:
            raise ValueError(f"start step {start_step} is outside [0, {self._steps}]")
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    def __len__(self) -> int:
        return self._steps - self.start_step

    def _real_count(self, step: int) -> int:
        return self._tail if self._tail and step == self._steps - 1 else self.real_per_batch

    def batch_size_of(self, step: int) -> int:
        """Images in global batch ``step`` (0-based) of an epoch, summed over the ranks."""
        return self._real_count(step) + self.generated_per_batch

    def _real_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Real part of every step of the epoch: consecutive permutations, tails dropped (or, in a
        one-pass epoch without ``drop_last``, the tail as the last step's real part)."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        per_pass = self.n_real // self.real_per_batch if self.real_per_batch else 0
        empty = torch.zeros(0, dtype=torch.int64)
        while True:
            if not per_pass:
                yield empty, empty
                continue
            perm = torch.randperm(self.n_real, generator=g)
            seeds = torch.randint(0, 2**62, (self.n_real,), generator=g)
            for q in range(per_pass):
                part = slice(q * self.real_per_batch, (q + 1) * self.real_per_batch)
                yield perm[part], seeds[part]
            if self._tail:
                yield perm[self.n_real - self._tail:], seeds[self.n_real - self._tail:]

    def _generated(self, step: int, part: slice) -> tuple[list[int], list[int]]:
        """Indices and seeds at positions ``part`` of the generated part of ``step``.

        Position ``p`` of the cross-epoch stream lies in cycle ``p // N``, which maps it through
        its own keyed permutation; only this rank's positions are computed.
        """
        first = ((self.epoch - 1) * self._steps + step) * self.generated_per_batch
        pos = np.arange(first + part.start, first + part.stop, dtype=np.uint64)
        n = np.uint64(max(1, self.n_generated))
        cycle, offset = pos // n, pos % n
        idx = np.empty(len(pos), dtype=np.int64)
        for c in np.unique(cycle):
            here = cycle == c
            idx[here] = KeyedPermutation(self.n_generated, _mix_int(self.seed * _GOLDEN + int(c)))(offset[here])
        seeds = _mix64(pos ^ np.uint64(_mix_int(~self.seed))) >> np.uint64(2)  # in [0, 2**62)
        return (idx + self.n_real).tolist(), seeds.tolist()

    def _my_slices(self, n_real: int) -> tuple[slice, slice]:
        """This rank's slices of the real (``n_real`` images) and generated parts of a global batch.

        The real counts are as even across ranks as divisibility allows, the generated counts too
        with their extra images on the last ranks, so on a full batch rank ``k`` gets ``r_k`` real
        and ``global_batch / world_size - r_k`` generated images: every rank sees nearly the same mix.
        """
        w, k = self.world_size, self.rank
        base, extra = divmod(self.generated_per_batch, w)
        g_start = k * base + max(0, k - (w - extra))
        return rank_part(n_real, k, w), slice(g_start, g_start + base + (k >= w - extra))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        real = itertools.islice(self._real_batches(), self.start_step, None)
        for step in range(self.start_step, self._steps):
            real_idx, real_seeds = next(real)
            mine_real, mine_gen = self._my_slices(self._real_count(step))
            gen_idx, gen_seeds = self._generated(step, mine_gen)
            yield list(zip(real_idx[mine_real].tolist() + gen_idx, real_seeds[mine_real].tolist() + gen_seeds))
