"""Atomic file writing: the one implementation every writer of this project uses.

A file is written to a temp file in the same folder (``.NAME.<random>.tmp``, created with the
user's umask), flushed, fsync'ed and renamed over ``NAME``, then the folder is fsync'ed: a crash at
any moment leaves the previous complete file or the new complete file, never a partial one, and a
failed write removes its temp file. A folder is made the same way (:func:`atomic_folder`). One
process at a time writes into a run or evaluation folder (:func:`folder_lock`). This module does not
import torch.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

from errors import UserError

TEMP_GLOB = ".*.tmp"  # what a killed write can leave behind (see remove_stale_temp_files)
LOCK_NAME = ".lock"  # a folder's lock file (see folder_lock); it holds the PID of the process holding it


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


# --------------------------------------------------------------------------------------- one writer per folder
class FolderInUse(UserError):
    """Another living process holds the folder's lock; ``pid`` is its process id (None if unreadable)."""

    def __init__(self, message: str, pid: Optional[int]) -> None:
        super().__init__(message)
        self.pid = pid


def _lock_holder(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):  # the holder has not written its PID yet
        return None


def _acquire(path: Path, busy: Callable[[Optional[int]], str]) -> Optional[int]:
    """An open, exclusively flock'ed descriptor of ``path`` holding this PID; None where the file
    system has no locks. Raises ``FolderInUse`` (message ``busy(pid)``) when another process holds it."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _lock_holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FolderInUse(busy(holder), holder) from None
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        except BaseException:
            os.close(fd)
            raise
        try:  # the previous holder removes the file as it releases it: then lock the file now there
            st, here = os.fstat(fd), os.stat(path)
            current = (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "the lock file keeps being replaced", str(path))


@contextmanager
def folder_lock(folder: str | os.PathLike, busy: Callable[[Optional[int]], str]) -> Iterator[Optional[Path]]:
    """Hold an exclusive lock on ``folder`` (an existing folder) for the block: one writer at a time.

    The lock is a non-blocking ``flock`` on ``folder/.lock``, which holds this process's PID. The
    OS drops it when the process ends in any way (a SIGKILLed run never blocks its own resume);
    the file is removed on leaving the block. A second process gets ``FolderInUse`` with the
    message ``busy(pid)`` and changes nothing. Yields the lock file, or None where the file system
    does not support locks (the block then runs unlocked).
    """
    path = Path(folder) / LOCK_NAME
    fd = _acquire(path, busy)
    try:
        yield None if fd is None else path
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # while still held: a process waiting on this file retries
            os.close(fd)
