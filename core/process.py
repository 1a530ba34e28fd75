"""How the scripts' processes end: with their launcher (Linux's parent-death signal), and on stop signals.

torchrun starts each worker in a session of its own, so ``kill -9 -- -PGID`` of a job (or any
death of the launcher) leaves the workers running as orphans: they keep computing and keep the
folder's lock, and an immediate ``--resume`` is refused. :func:`exit_with_parent` asks the kernel
(``prctl(PR_SET_PDEATHSIG)``) to SIGKILL this process when its parent dies, as if it had been in
the killed process group: every file this project writes is renamed into place complete and every
lock dies with its process, so what the worker saved stays resumable.

The signal is armed only from the moment of the call; a parent that died before is noticed by
comparing the parent PID with the one recorded when this module was first imported (the scripts
import it before torch). Where the launcher died even earlier, during the interpreter's own start,
the worker was handed to init (PID 1) and is noticed too, unless a subreaper (a container's init,
``systemd --user``) adopted it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_AT_START = os.getppid()
# Set by torchrun (torch.distributed.elastic) in the environment of every worker it starts.
TORCHRUN_VARIABLE = "TORCHELASTIC_RUN_ID"


def launched_by_torchrun() -> bool:
    """Whether this process is a worker that torchrun started."""
    return TORCHRUN_VARIABLE in os.environ


def exit_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent ends; if the parent is already gone,
    send it now. Returns False where this is not available (not Linux), True once armed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_died():
        os.kill(os.getpid(), sig)
    return True


def parent_died() -> bool:
    """Whether the process that started this one has ended (this one was handed to another parent)."""
    parent = os.getppid()
    return parent != PARENT_AT_START or parent == 1


def end_with_launcher() -> None:
    """The scripts' call: under torchrun, end this worker when the launcher ends (see :func:`exit_with_parent`)."""
    if launched_by_torchrun():
        exit_with_parent()


# --------------------------------------------------------------------------------------- stop signals
# A script stops on its first SIGINT (Ctrl-C) or SIGTERM. A second one, often sent a moment later by an
# impatient user or a scheduler, must not turn a clean stop into "Exception ignored in atexit callback ...
# KeyboardInterrupt": once the process is stopping, further stop signals are ignored.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal reached a script inside :func:`stop_signals`; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class _StopState:
    message: Optional[str] = None  # said when a signal arrives before main() runs (the process then ends at once)
    raising = False  # inside stop_signals(): the first signal raises Interrupted
    stopping = False  # the process is on its way out: stop signals are ignored


_STOP = _StopState()


def _on_stop_signal(signum: int, frame: object) -> None:
    if _STOP.stopping:
        return
    _STOP.stopping = True
    if _STOP.raising:
        raise Interrupted(signum)
    print(_STOP.message or f"stopped by signal {signum}", file=sys.stderr, flush=True)
    os._exit(128 + signum)  # during the imports: nothing was written yet, nothing to clean up


def script_start(message: str) -> None:
    """A script's first call, before its slow imports: until :func:`stop_signals` runs, a stop signal
    ends the process at once with the one line ``message`` (a KeyboardInterrupt would print a
    traceback from inside an import)."""
    _STOP.message = message
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)


@contextmanager
def stop_signals() -> Iterator[None]:
    """Inside the block the first SIGINT/SIGTERM raises :class:`Interrupted` and later ones are ignored
    (a trainer installs its own handlers while it trains and calls :func:`stopping` on its first
    signal). The previous handlers are back after the block. Outside the main thread (where Python
    allows no handlers) the block runs with the handlers as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _STOP.stopping, _STOP.raising = False, True
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)
    try:
        yield
    finally:
        _STOP.raising = False
        for s, handler in previous.items():
            signal.signal(s, handler)


def stopping() -> None:
    """Say that the process is on its way out: from now on stop signals are ignored (see :func:`stop_signals`)."""
    _STOP.stopping = True


def script_end(code: int) -> int:
    """A script's last call: the exit code, with stop signals ignored while the interpreter shuts down.

    Ignored by the OS (``SIG_IGN``), not by a Python handler: the interpreter's last steps put Python
    handlers back to the default action, which a late Ctrl-C would turn into a death by SIGINT."""
    stopping()
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    return code
