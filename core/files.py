"""Atomic file writing: the one implementation every writer of this project uses.

A file is written to a temp file in the same folder (``.NAME.<random>.tmp``, created with the
user's umask), flushed, fsync'ed and renamed over ``NAME``, then the folder is fsync'ed: a crash at
any moment leaves the previous complete file or the new complete file, never a partial one, and a
failed write removes its temp file. A folder is made the same way (:func:`atomic_folder`). This
module does not import torch.
"""
from __future__ import annotations

import errno
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

TEMP_GLOB = ".*.tmp"  # what a killed write can leave behind (see remove_stale_temp_files)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder so that a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    """Open a new temp file next to ``path`` with the umask's permissions (mkstemp would force 0600)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(path.parent))


def os_error_in(exc: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind ``exc`` (torch's zip writer wraps a failed write in a RuntimeError)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], Any], *, binary: bool = True) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills an open temp file, which then replaces ``path``.

    Raises what ``write`` or the file system raised (an OSError wrapped by ``write`` is unwrapped),
    after removing the temp file; ``path`` itself is then untouched.
    """
    path = Path(path)
    tmp: Optional[Path] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        cause = os_error_in(e) if isinstance(e, RuntimeError) else None
        if cause is not None:
            raise cause from None
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a string."""
    return atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the bytes of ``src`` into ``dst`` atomically; ``dst`` is an independent file."""
    with open(src, "rb") as source:
        return atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 24))


@contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``out`` to fill; on success it is renamed to ``out`` (which may be an
    empty folder), on any error it is removed. Files inside should be fsync'ed by the writer."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)


def remove_temp_files(folder: str | os.PathLike, patterns: tuple[str, ...] = (TEMP_GLOB,)) -> list[Path]:
    """Delete the temp files of writes killed mid-way in ``folder`` (not recursive); returns them.

    Call it only when no other process writes into ``folder``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for pattern in patterns:
        for p in folder.glob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return sorted(removed)


def atomic_link(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` a hard link to ``src`` (a copy where hard links are not supported), atomically."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst
