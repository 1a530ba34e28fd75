"""Convert DM-AT generated-data ``.npz`` files into memory-mappable ``.npy`` shards.

The published files (20M and 50M images, 60 to 150 GB decoded) hold two arrays, ``image``
(N x 32 x 32 x 3 uint8) and ``label`` (N,) integer. ``np.load`` decodes a whole ``.npz`` member
into RAM, so this converter reads each member as a stream instead: it parses the ``.npy`` header
inside the zip and copies fixed-size chunks into shards created with
``numpy.lib.format.open_memmap``. At most one chunk is held in memory, whether the member is
stored or deflated. The output folder holds::

    images_00000.npy  (n, 32, 32, 3) uint8      labels_00000.npy  (n,) int64
    ...
    index.json        counts, shapes, dtypes, num_classes, class counts, sources, file sizes and
                      SHA-256 digests of every shard file (``sha256sum images_00000.npy`` matches)

The folder is written under a temporary name and renamed when complete (``core.files.atomic_folder``),
so a failed or interrupted conversion never leaves a folder that looks valid. This module does not
import torch, so that the converter's own memory stays small. Run it as a module::

    python -m data.convert_generated IN.npz [IN2.npz ...] OUT_DIR [--shard-size N] [--num-classes C]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence, Union

import numpy as np
from numpy.lib import format as npy_format
from tqdm import tqdm

from core.files import atomic_folder
from errors import UserError

PathLike = Union[str, os.PathLike]
IMAGE_SHAPE = (32, 32, 3)
LABEL_DTYPE = np.dtype("<i8")
INDEX_NAME = "index.json"
INDEX_FORMAT = "gkl-at generated shards"
INDEX_VERSION = 1
DEFAULT_SHARD_SIZE = 1_000_000  # 3 GB of images per shard file
DEFAULT_CHUNK_SIZE = 4096  # 12.6 MB of images in memory at a time
_PIECE_BYTES = 1 << 20
MAX_CLASSES = 1 << 20  # without --num-classes, larger labels are taken as a broken file


@dataclass(frozen=True)
class ArrayHeader:
    """Shape and dtype of one ``.npy`` member of an ``.npz``."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


@dataclass
class SourceInfo:
    """A validated input file and its class histogram."""

    path: Path
    size: int
    count: int
    class_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def shard_names(k: int) -> tuple[str, str]:
    """File names of the ``k``-th image shard and label shard."""
    return f"images_{k:05d}.npy", f"labels_{k:05d}.npy"


# ---------------------------------------------------------------------------------------------
# Reading .npz members as streams


def _member(zf: zipfile.ZipFile, key: str, path: Path) -> str:
    name = f"{key}.npy"
    if name not in zf.namelist():
        found = ", ".join(repr(n.removesuffix(".npy")) for n in zf.namelist()) or "nothing"
        raise UserError(f"{path}: no array {key!r} (found {found}); DM-AT files hold 'image' and 'label'")
    return name


def read_header(stream: IO[bytes], where: str) -> ArrayHeader:
    """Parse an ``.npy`` header from ``stream``, leaving it at the first data byte."""
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as exc:
        raise UserError(f"{where}: not a readable .npy array ({exc}); re-save it with numpy.savez") from None
    if fortran and len(shape) > 1:
        raise UserError(f"{where}: stored in Fortran order; re-save it with np.ascontiguousarray")
    return ArrayHeader(tuple(shape), np.dtype(dtype))


def iter_chunks(stream: IO[bytes], header: ArrayHeader, rows: int, where: str) -> Iterator[np.ndarray]:
    """Yield blocks of at most ``rows`` rows from ``stream`` (positioned at the data).

    Every block is a view of one reused buffer: use it before asking for the next.
    """
    buf = np.empty(min(rows, header.shape[0]) * header.row_bytes, dtype=np.uint8)
    left = header.shape[0]
    while left:
        n = min(rows, left)
        view = memoryview(buf)[:n * header.row_bytes]
        _read_exact(stream, view, where)
        yield buf[:len(view)].view(header.dtype).reshape((n, *header.shape[1:]))
        left -= n


def _read_exact(stream: IO[bytes], out: memoryview, where: str) -> None:
    # small read1 pieces copied into a reused buffer: no second chunk-sized bytes object is built
    pos = 0
    while pos < len(out):
        piece = stream.read1(min(len(out) - pos, _PIECE_BYTES))
        if not piece:
            raise UserError(f"{where}: the file is truncated; download it again")
        out[pos:pos + len(piece)] = piece
        pos += len(piece)


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise UserError(f"input file {path} does not exist; pass the path of a DM-AT .npz file")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not an .npz (zip) file; pass a file written by numpy.savez") from None


# ---------------------------------------------------------------------------------------------
# Validation (before anything is written)


def _check_headers(path: Path, image: ArrayHeader, label: ArrayHeader) -> None:
    if image.dtype != np.uint8:
        raise UserError(f"{path}: 'image' has dtype {image.dtype}, expected uint8 pixels in [0, 255]")
    if len(image.shape) != 4 or image.shape[1:] != IMAGE_SHAPE:
        raise UserError(f"{path}: 'image' has shape {image.shape}, expected (N, 32, 32, 3) (HWC layout)")
    if label.dtype.kind not in "iu":
        raise UserError(f"{path}: 'label' has dtype {label.dtype}, expected integer class indices")
    if label.shape != image.shape[:1]:
        raise UserError(f"{path}: 'label' has shape {label.shape}, expected ({image.shape[0]},) like 'image'")


def _scan_labels(zf: zipfile.ZipFile, name: str, info: SourceInfo, num_classes: Optional[int]) -> None:
    """Stream the label member once: check every label is in range and count classes."""
    where, bound = f"{info.path}:label", num_classes or MAX_CLASSES
    counts, start = np.zeros(0, np.int64), 0
    with zf.open(name) as f:
        header = read_header(f, where)
        for chunk in iter_chunks(f, header, 1 << 20, where):
            bad = np.flatnonzero((chunk < 0) | (chunk >= bound))
            if len(bad):
                i = int(bad[0])
                hint = "pass the right --num-classes" if num_classes else "labels must be class indices"
                raise UserError(f"{info.path}: label {chunk[i]} at index {start + i} is outside [0, {bound}); "
                                f"{hint} or check the file")
            part = np.bincount(chunk.astype(np.intp), minlength=len(counts))
            part[:len(counts)] += counts
            counts, start = part, start + len(chunk)
    info.class_counts = counts


def inspect_npz(path: PathLike, num_classes: Optional[int] = None) -> SourceInfo:
    """Validate one ``.npz`` (keys, dtypes, shapes, label range) without decoding its images."""
    path = Path(path)
    try:
        with _open_zip(path) as zf:
            names = [_member(zf, key, path) for key in ("image", "label")]
            with zf.open(names[0]) as f:
                image = read_header(f, f"{path}:image")
            with zf.open(names[1]) as f:
                label = read_header(f, f"{path}:label")
            _check_headers(path, image, label)
            info = SourceInfo(path.resolve(), path.stat().st_size, image.shape[0])
            _scan_labels(zf, names[1], info, num_classes)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise UserError(f"{path}: corrupt .npz ({exc}); download it again") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc}); check the path and permissions") from None
    return info


# ---------------------------------------------------------------------------------------------
# Writing shards


class ShardWriter:
    """Writes a stream of (images, labels) blocks into shards of ``shard_size`` images.

    Shard files are created with ``open_memmap`` at their final size (the total is known from
    the headers); each block is written through a short-lived mapping, so written pages leave
    this process's resident set as soon as the block is done.
    """

    def __init__(self, folder: Path, total: int, shard_size: int) -> None:
        self.folder, self.total, self.shard_size = folder, total, shard_size
        self.written = 0
        self.shards: list[dict] = []
        self._digests: list[tuple] = []

    def _shard_len(self, k: int) -> int:
        return min(self.shard_size, self.total - k * self.shard_size)

    def _create(self, k: int) -> None:
        n = self._shard_len(k)
        digests = []
        for name, shape, dtype in zip(shard_names(k), ((n, *IMAGE_SHAPE), (n,)), (np.uint8, LABEL_DTYPE)):
            mm = npy_format.open_memmap(self.folder / name, mode="w+", dtype=dtype, shape=shape)
            offset = mm.offset
            del mm
            with open(self.folder / name, "rb") as f:
                digests.append(hashlib.sha256(f.read(offset)))  # the header, so digests cover whole files
        self.shards.append({"images": shard_names(k)[0], "labels": shard_names(k)[1], "count": n})
        self._digests.append(tuple(digests))

    def _write_block(self, name: str, start: int, block: np.ndarray) -> None:
        mm = npy_format.open_memmap(self.folder / name, mode="r+")
        mm[start:start + len(block)] = block
        # Unmapping drops the written pages from this process's resident set; the kernel writes
        # them back from the page cache (a shared mapping), so no msync per block is needed.
        del mm

    def _sync(self, k: int) -> None:
        # the folder is renamed into place only after its shards are durable
        for name in shard_names(k):
            fd = os.open(self.folder / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def write(self, images: np.ndarray, labels: np.ndarray) -> None:
        """Append ``images`` (n, 32, 32, 3) uint8 and ``labels`` (n,) integer to the shards."""
        done = 0
        while done < len(images):
            k, pos = divmod(self.written, self.shard_size)
            if pos == 0:
                self._create(k)
            n = min(len(images) - done, self._shard_len(k) - pos)
            blocks = (images[done:done + n], labels[done:done + n].astype(LABEL_DTYPE, copy=False))
            for name, block, digest in zip(shard_names(k), blocks, self._digests[k]):
                self._write_block(name, pos, block)
                digest.update(np.ascontiguousarray(block).data)
            done += n
            self.written += n
            if pos + n == self._shard_len(k):
                self._sync(k)

    def finish(self) -> list[dict]:
        """Shard records for the index: names, counts, file sizes and SHA-256 of each file."""
        if self.written != self.total:
            raise RuntimeError(f"wrote {self.written} of {self.total} images")
        for shard, (d_img, d_lbl) in zip(self.shards, self._digests):
            shard["images_sha256"], shard["labels_sha256"] = d_img.hexdigest(), d_lbl.hexdigest()
            shard["images_bytes"] = (self.folder / shard["images"]).stat().st_size
            shard["labels_bytes"] = (self.folder / shard["labels"]).stat().st_size
        return self.shards


def _copy_source(src: SourceInfo, writer: ShardWriter, chunk_size: int, bar: tqdm) -> None:
    try:
        with zipfile.ZipFile(src.path) as zf, zf.open("image.npy") as fi, zf.open("label.npy") as fl:
            image, label = read_header(fi, f"{src.path}:image"), read_header(fl, f"{src.path}:label")
            blocks = zip(iter_chunks(fi, image, chunk_size, f"{src.path}:image"),
                         iter_chunks(fl, label, chunk_size, f"{src.path}:label"))
            for images, labels in blocks:
                writer.write(images, labels)
                bar.update(len(images))
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise UserError(f"{src.path}: corrupt .npz ({exc}); download it again") from None


# ---------------------------------------------------------------------------------------------
# Conversion


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; pass a folder path for the shards")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"output folder {out} is not empty; choose a new OUT_DIR or delete its contents")


def _check_sizes(shard_size: int, chunk_size: int, num_classes: Optional[int]) -> None:
    for flag, value in (("--shard-size", shard_size), ("--chunk-size", chunk_size), ("--num-classes", num_classes)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be a positive integer")


def _index(sources: list[SourceInfo], shards: list[dict], num_classes: int, shard_size: int) -> dict:
    counts = np.zeros(num_classes, np.int64)
    for src in sources:
        counts[:len(src.class_counts)] += src.class_counts
    return {
        "format": INDEX_FORMAT, "version": INDEX_VERSION, "count": sum(s.count for s in sources),
        "num_classes": num_classes, "image_shape": list(IMAGE_SHAPE), "image_dtype": "uint8",
        "label_dtype": LABEL_DTYPE.name, "shard_size": shard_size, "class_counts": counts.tolist(),
        "shards": shards,
        "sources": [{"path": str(s.path), "bytes": s.size, "count": s.count} for s in sources],
    }


def convert(inputs: Sequence[PathLike], out_dir: PathLike, shard_size: int = DEFAULT_SHARD_SIZE,
            num_classes: Optional[int] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
            progress: bool = True) -> dict:
    """Convert ``inputs`` (DM-AT ``.npz`` files, concatenated in order) into shards in ``out_dir``.

    ``num_classes`` defaults to the largest label + 1. Returns the index written to
    ``out_dir/index.json``. Raises ``UserError`` for bad inputs before anything is written.
    """
    out = Path(out_dir)
    _check_sizes(shard_size, chunk_size, num_classes)
    if not inputs:
        raise UserError("no input files; pass one or more DM-AT .npz files before OUT_DIR")
    _check_out_dir(out)
    sources = [inspect_npz(p, num_classes) for p in inputs]
    total = sum(s.count for s in sources)
    if total == 0:
        raise UserError(f"the inputs hold no images ({', '.join(map(str, inputs))}); pass non-empty .npz files")
    num_classes = num_classes or max(len(s.class_counts) for s in sources)
    try:
        with atomic_folder(out) as tmp:  # renamed over an empty existing folder (checked above)
            writer = ShardWriter(tmp, total, shard_size)
            with tqdm(total=total, unit="img", unit_scale=True, desc="converting", disable=not progress) as bar:
                for src in sources:
                    _copy_source(src, writer, chunk_size, bar)
            index = _index(sources, writer.finish(), num_classes, shard_size)
            with open(tmp / INDEX_NAME, "w") as f:
                json.dump(index, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        raise UserError(f"converting into {out} failed ({exc}); check the disk space and paths") from None
    return index


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the converter."""
    p = argparse.ArgumentParser(description="Convert DM-AT generated-data .npz files to .npy shards.")
    p.add_argument("paths", nargs="+", metavar="IN.npz ... OUT_DIR", help="input files, then the output folder")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard file")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (default: max label + 1)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="images held in memory at once")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: returns 0 on success, 2 with a one-line message for a user error."""
    args = build_parser().parse_args(argv)
    try:
        if len(args.paths) < 2:
            raise UserError("give at least one input .npz file and then the output folder")
        *inputs, out = args.paths
        index = convert(inputs, out, args.shard_size, args.num_classes, args.chunk_size, not args.quiet)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UserError.exit_code
    print(f"wrote {index['count']} images ({index['num_classes']} classes) in {len(index['shards'])} "
          f"shards to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
