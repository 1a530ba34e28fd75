"""Run-folder policy: when train_at.py and eval_autoattack.py may write into a folder, checked before they do.

- One writer per folder: a trainer holds ``RUN/.lock``, an evaluation ``OUT/.lock``, exclusively
  (:func:`core.files.folder_lock`); an export reads an evaluation under a shared lock. A second
  process is refused with one line naming the holder's PID.
- A new run never starts over another run's checkpoints unless ``--overwrite``, and an overwrite
  removes nothing while any lock under the run is held (an evaluation or export of it is going).
- A folder is proved writable (a probe file written and fsync'ed) and, for a run, to have room
  for the checkpoints it keeps at its peak, before any work starts; a new run folder is created
  only after every check passed.
- An evaluation writes results only for the checkpoint file it loaded: :func:`file_identity` at
  the start and :func:`check_unchanged` before the reports.
- Links: a run folder, ``--out`` or ``RUN/eval`` may be a symbolic link to a folder (scratch
  storage is often linked in); writes go into the folder it points to and its lock is taken
  there. ``--overwrite`` removes such a link, never the folder it points to. Files are never
  written through links: a lock file that is a link is refused, every other write renames a new
  file over its name (:mod:`core.files`).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

from core.files import LOCK_NAME, folder_lock, lock_holder
from errors import UserError

from .io import ensure_free_space, load_latest_checkpoint

PROBE_PREFIX = ".write_probe."  # a killed probe's leftover matches checkpoints.io.TEMP_PATTERNS
PROBE_BYTES = 4096
EVAL_DIR = "eval"
# What ``--overwrite`` removes: the earlier run's files that could be mistaken for the new run's.
RUN_FILES = ("log.csv", "training_curves.png")

Identity = Optional[tuple[int, int, int, int]]


def has_checkpoints(run_dir: Path) -> bool:
    """Whether ``run_dir/checkpoints`` holds any ``.pt`` file."""
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(folder.glob("*.pt"))


def _holder(pid: Optional[int]) -> str:
    """How a message names a lock's holder."""
    return f"process {pid}" if pid else "another process"


# --------------------------------------------------------------------------------------- training runs
def check_resumable(run_dir: Path) -> None:
    """Refuse ``--resume`` of a folder that holds nothing to resume; reads only."""
    if not run_dir.is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    if not (run_dir / "config.yaml").is_file() or not has_checkpoints(run_dir):
        raise UserError(f"--resume {run_dir}: no config.yaml and checkpoints/*.pt there, so nothing to resume "
                        "(is it a run folder of train_at.py? a run killed before its first checkpoint "
                        "starts afresh with --out)")


def check_new_run(run_dir: Path, overwrite: bool, *, locked: bool = False) -> None:
    """Refuse to start afresh over a file, a running run, or (without ``overwrite``) another run; writes nothing.

    ``locked``: this process holds the run folder's lock (so nobody else does).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a folder: choose another --out")
    held = None if locked else lock_holder(run_dir / LOCK_NAME)
    if held is not None:
        raise UserError(training_busy(run_dir, resuming=False)(held.pid))
    if has_checkpoints(run_dir) and not overwrite:
        raise UserError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                        "choose another --out, or pass --overwrite")


def training_busy(run_dir: Path, resuming: bool) -> Callable[[Optional[int]], str]:
    """The message for a run folder whose lock another process holds."""
    def busy(pid: Optional[int]) -> str:
        if resuming:
            return (f"--resume {run_dir}: the run is still going ({_holder(pid)} holds {run_dir / LOCK_NAME}); "
                    f"wait for it to end or stop it{f' (kill {pid})' if pid else ''}, then resume")
        return (f"--out {run_dir} is in use by another training run ({_holder(pid)} holds {run_dir / LOCK_NAME}): "
                "choose another --out, or wait for that run to end")
    return busy


def run_lock(run_dir: Path, resuming: bool) -> contextlib.AbstractContextManager[Optional[Path]]:
    """The exclusive lock of the run folder (``RUN/.lock``), held by the process that writes (rank 0)."""
    return folder_lock(run_dir, training_busy(run_dir, resuming))


def clear_previous_run(run_dir: Path) -> list[str]:
    """``--overwrite``: remove the earlier run's checkpoints, log and evaluation so none of them is mistaken
    for the new run's (a resume falls back to the newest epoch file). Call it holding ``RUN/.lock``.

    Every folder under the run that holds a lock (``RUN/eval`` always) is locked exclusively for the
    removal: while an evaluation or an export of the run holds one, nothing is removed and the
    ``UserError`` names its PID. A link (``RUN/eval``, a checkpoint) is removed, not what it points to.
    """
    def busy(folder: Path) -> Callable[[Optional[int]], str]:
        return lambda pid: (f"--overwrite {run_dir}: {folder} is in use by an evaluation or export of this run "
                            f"({_holder(pid)} holds {folder / LOCK_NAME}); wait for it to end or stop it"
                            f"{f' (kill {pid})' if pid else ''}, then retry: nothing was removed")

    removed = []
    with contextlib.ExitStack() as locks:
        for folder in _locked_folders(run_dir):
            locks.enter_context(folder_lock(folder, busy(folder)))
        folder = run_dir / "checkpoints"
        for path in sorted(folder.glob("*.pt")) if folder.is_dir() else []:
            path.unlink(missing_ok=True)
            removed.append(str(path))
        for path in [run_dir / name for name in RUN_FILES] + [run_dir / EVAL_DIR]:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                continue
            removed.append(str(path))
    return removed


def _locked_folders(run_dir: Path) -> list[Path]:
    """``RUN/eval`` (also through a link) and every folder under the run holding a lock file, except the run's own."""
    found = [(run_dir / EVAL_DIR).resolve()] if (run_dir / EVAL_DIR).is_dir() else []  # where its lock lives
    for here, dirs, files in os.walk(run_dir):  # links to folders are not followed
        folder = Path(here)
        if LOCK_NAME in files and folder != run_dir and folder.resolve() not in found:
            found.append(folder.resolve())
    return found


def finished_epoch(run_dir: Path, epochs: int) -> tuple[Optional[int], list[str]]:
    """The last epoch of a finished run (its newest complete checkpoint ends epoch ``epochs``), else None,
    and the notes of what was skipped to find it. Only reads (tensors memory-mapped); any problem is left
    to the resume itself to report."""
    try:
        _, state, notes = load_latest_checkpoint(run_dir / "checkpoints", mmap=True)
    except UserError:
        return None, []
    epoch = state.get("epoch") if isinstance(state, dict) else None
    if isinstance(epoch, int) and epoch >= epochs and not state.get("step_in_epoch"):
        return epoch, notes
    return None, []


def check_free_space(run_dir: Path, checkpoint_bytes: int, epochs: int, keep_checkpoints: int) -> None:
    """Enough disk for the checkpoints this run keeps at its peak.

    Every kept file is an independent copy: last.pt and its temp file while it is rewritten, best.pt,
    and the rolling epoch files (all of them with --keep-checkpoints 0), one of which is the temp file
    of the newest while it is copied. Files already there (a resume) are counted once per inode, as
    run folders of earlier versions hold hard links.
    """
    size = checkpoint_bytes + 2**20
    rolling = min(keep_checkpoints, epochs) if keep_checkpoints else epochs
    peak = size * (rolling + 3)
    folder = run_dir / "checkpoints"
    inodes = {p.stat().st_ino: p.stat().st_size for p in folder.glob("*.pt")} if folder.is_dir() else {}
    ensure_free_space(_existing(run_dir), max(peak - sum(inodes.values()), size), f"the checkpoints of {run_dir}")


# --------------------------------------------------------------------------------------- any output folder
def _existing(folder: Path) -> Path:
    return next((p for p in (folder, *folder.absolute().parents) if p.is_dir()), Path("/"))


def probe_writable(folder: Path, *, create: bool, what: str = "run folder") -> None:
    """Prove ``folder`` writable: write, fsync and remove a probe file (a full or read-only disk fails here).

    ``create``: make the folder first; otherwise probe the folder, or the nearest existing folder above
    it (nothing is created). Raises ``UserError`` naming the folder and the reason.
    """
    def fail(reason: str) -> UserError:
        return UserError(f"cannot write to {what} {folder}: {reason} "
                         "(free some space, fix its permissions or choose another --out)")

    target = folder if create else _existing(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        elif shutil.disk_usage(target).total == 0:
            raise fail(f"{target} is a virtual file system (like /proc or /sys) that stores no files")
        probe = target / f"{PROBE_PREFIX}{os.getpid()}.{secrets.token_hex(4)}"  # torchrun ranks probe at once
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, b"0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise fail(e.strerror or str(e)) from None


def output_lock(out: Path, busy: Callable[[Optional[int]], str]) -> contextlib.AbstractContextManager[Optional[Path]]:
    """Create ``out``, prove it writable and hold its exclusive lock (see :func:`core.files.folder_lock`)."""
    probe_writable(out, create=True, what="output folder")
    return folder_lock(out, busy)


@contextlib.contextmanager
def reading(folders: list[Path], what: str) -> Iterator[None]:
    """Hold the shared lock of each existing folder in ``folders`` while ``what`` reads from it: refused
    (one line naming the writer's PID) while an evaluation writes there."""
    def busy(folder: Path) -> Callable[[Optional[int]], str]:
        return lambda pid: (f"{folder} is being written by an evaluation ({_holder(pid)} holds "
                            f"{folder / LOCK_NAME}): wait for it to end, then {what} again")

    with contextlib.ExitStack() as locks:
        for folder in dict.fromkeys(f for f in folders if f.is_dir()):
            locks.enter_context(folder_lock(folder, busy(folder), shared=True))
        yield


# --------------------------------------------------------------------------------------- the evaluated file
def file_identity(path: str | os.PathLike) -> Identity:
    """What changes when a file is replaced or rewritten: (device, inode, size, mtime); None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_unchanged(path: str | os.PathLike, identity: Identity, kept: str) -> None:
    """Refuse (``UserError``) to write results for ``path`` when it is no longer the file that was loaded."""
    if file_identity(path) != identity:
        raise UserError(f"{path} changed while it was evaluated (a newer checkpoint was saved over it, or "
                        f"--overwrite removed it): no report is written for it; {kept}. Evaluate a checkpoint "
                        "that stays (--checkpoint epoch_NNNN), or run the evaluation again")
