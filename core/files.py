"""Atomic file writing and folder locks: the one implementation every writer of this project uses.

A file is written to a temp file in the same folder (``.NAME.<random>.tmp``, created with the
user's umask), flushed, fsync'ed and renamed over ``NAME``, then the folder is fsync'ed: a crash at
any moment leaves the previous complete file or the new complete file, never a partial one, and a
failed write removes its temp file. The temp file is created with ``O_EXCL`` (never through an
existing name) and the rename replaces a link at ``NAME`` rather than writing through it. A folder
is made the same way (:func:`atomic_folder`). One process at a time writes into a run or
evaluation folder, readers share it (:func:`folder_lock`). This module does not import torch.

Why the folder lock is written here rather than taken from ``filelock`` (read from filelock 4.3's
``UnixFileLock``): that lock is exclusive only. This project's readers (an export reading an
evaluation's report) must hold a shared ``flock`` on the very file a writer locks exclusively, and
``--overwrite`` must see whether anybody holds a lock without creating one (:func:`lock_holder`):
neither exists there, and mixing its exclusive lock with hand-written shared ones would be two
implementations of one lock file. Its native lock also keeps no holder PID (our messages name the
PID) and falls back to marker files that a SIGKILL leaves behind. On the symlink hole both agree:
filelock opens with ``O_NOFOLLOW`` only since 3.20.1 (CVE-2025-68146; torch accepts any
filelock), this module always does and also refuses FIFOs and hard-linked files.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from dataclasses import dataclass
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
# The lock file is opened without following a link (O_NOFOLLOW: a planted ``.lock`` symlink fails with ELOOP
# instead of having its target truncated), without blocking on a FIFO (O_NONBLOCK), and is then refused unless
# it is a regular file with a single name (a hard link to a file elsewhere would have that file overwritten).
_LOCK_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class FolderInUse(UserError):
    """Another living process holds the folder's lock; ``pid`` is its process id (None if unreadable)."""

    def __init__(self, message: str, pid: Optional[int]) -> None:
        super().__init__(message)
        self.pid = pid


def _not_a_lock_file(path: Path, what: str) -> UserError:
    return UserError(f"{path} is {what}, not a lock file of this project: nothing is written through it; "
                     f"remove it (rm {path}) and retry")


def _open_lock_file(path: Path, flags: int) -> int:
    """A descriptor of the lock file ``path``; a link, a non-regular file or a file with other names is refused."""
    try:
        fd = os.open(path, flags | _LOCK_OPEN_FLAGS, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _not_a_lock_file(path, "a symbolic link") from None
        if e.errno in (errno.EISDIR, errno.ENXIO):
            raise _not_a_lock_file(path, "not a regular file") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise _not_a_lock_file(path, "not a regular file" if not stat.S_ISREG(st.st_mode) else
                               f"a file with {st.st_nlink} hard links")
    return fd


def _lock_holder(fd: int) -> Optional[int]:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):  # a reader holds it, or the holder has not written its PID yet
        return None


def _is_current(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing holder removes it)."""
    try:
        st, here = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _write_pid(fd: int, path: Path) -> None:
    """Put this process's PID into the held lock file; on failure (a full disk) remove it and say so in one line."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        if _is_current(fd, path):
            path.unlink(missing_ok=True)
        os.close(fd)
        raise UserError(f"cannot write the lock file {path}: {e.strerror or e} (free some space or fix the "
                        "folder's permissions, or choose another --out)") from None


def _acquire(path: Path, busy: Callable[[Optional[int]], str], shared: bool) -> Optional[int]:
    """An open, flock'ed descriptor of ``path`` (exclusive and holding this PID, or ``shared``); None where the
    file system has no locks, or for a reader of a folder it cannot write. Raises ``FolderInUse`` (message
    ``busy(pid)``) when another process holds it in a conflicting mode."""
    for _ in range(100):
        try:
            fd = _open_lock_file(path, (os.O_RDONLY if shared else os.O_RDWR) | os.O_CREAT)
        except OSError as e:
            if shared and e.errno in _READ_ONLY:  # nobody who cannot create the lock file writes there either
                return None
            raise UserError(f"cannot create the lock file {path}: {e.strerror or e} (free some space or fix the "
                            "folder's permissions, or choose another --out)") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            holder = _lock_holder(fd) if e.errno in _BUSY else None
            os.close(fd)
            if e.errno in _BUSY:
                raise FolderInUse(busy(holder), holder) from None
            if e.errno in _NO_LOCKS:
                return None
            raise
        except BaseException:
            os.close(fd)
            raise
        if _is_current(fd, path):  # else the previous holder removed it as it released it: lock the file now there
            if not shared:
                _write_pid(fd, path)
            return fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "the lock file keeps being replaced", str(path))


@contextmanager
def folder_lock(folder: str | os.PathLike, busy: Callable[[Optional[int]], str], *,
                shared: bool = False) -> Iterator[Optional[Path]]:
    """Hold the lock of ``folder`` (an existing folder) for the block: one writer, or any number of readers.

    The lock is a non-blocking ``flock`` on ``folder/.lock``: exclusive for a writer, which puts its
    PID into the file and removes the file on leaving the block; ``shared`` for a reader, which
    neither writes nor removes it. The OS drops a lock when its process ends in any way (a
    SIGKILLed run never blocks its own resume). A process that meets a conflicting holder gets
    ``FolderInUse`` with the message ``busy(pid)`` and changes nothing. A ``.lock`` that is a link,
    not a regular file or a file with other hard links is refused (``UserError``), never written
    through. Yields the lock file, or None where the file system has no locks (the block then runs
    unlocked) and for a reader of a folder it may not write into.
    """
    path = Path(folder) / LOCK_NAME
    fd = _acquire(path, busy, shared)
    try:
        yield None if fd is None else path
    finally:
        if fd is not None:
            if not shared and _is_current(fd, path):
                path.unlink(missing_ok=True)  # while still held: a process waiting on this file retries
            os.close(fd)


@dataclass(frozen=True)
class LockHolder:
    """A held folder lock: its file, the writer's PID (None for readers or when unreadable), whether readers hold it."""

    path: Path
    pid: Optional[int]
    shared: bool


def lock_holder(path: str | os.PathLike) -> Optional[LockHolder]:
    """Who holds the lock file ``path`` right now; None when nobody does or there is no such lock file.

    Only looks: creates and writes nothing (a link or a non-regular file is not a lock anyone holds).
    """
    path = Path(path)
    try:
        fd = _open_lock_file(path, os.O_RDONLY)
    except (OSError, UserError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            return LockHolder(path, _lock_holder(fd), False) if e.errno in _BUSY else None
        try:  # no writer; readers if the lock cannot become exclusive
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            return LockHolder(path, None, True) if e.errno in _BUSY else None
        return None
    finally:
        os.close(fd)
