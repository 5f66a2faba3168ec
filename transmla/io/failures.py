"""Ending a command cleanly: termination signals raised as KeyboardInterrupt (so temporary folders are removed),
and one-line messages for disk failures."""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EIO: "an input/output error occurred",
}


class Terminated(KeyboardInterrupt):
    """A termination signal (SIGTERM, SIGHUP) received while a command ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


_interrupts: list[int] = []  # SIGINTs received in the current terminate_as_interrupt block


def _raise_interrupt(signum: int, frame: object) -> None:
    _interrupts.append(signum)
    raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether Ctrl-C came during the last terminate_as_interrupt block: a library interrupted mid-import may
    swallow the KeyboardInterrupt and fail later with another error, which is then the interrupt's doing."""
    return bool(_interrupts)


@contextmanager
def terminate_as_interrupt(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block, `signals` that would kill the process at once raise `Terminated` instead, and Ctrl-C
    (SIGINT) raises KeyboardInterrupt, whatever the caller made it do outside (`transmla.__main__` ends the
    process at once while nothing is being written).

    Handlers that someone else installed for `signals` (or SIG_IGN, e.g. under nohup, for any) are left alone;
    outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in signals:
        if signal.getsignal(sig) == signal.SIG_DFL:
            previous[sig] = signal.signal(sig, _raise_terminated)
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupt)
    _interrupts.clear()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C)."""
    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def disk_error_line(exc: OSError) -> str | None:
    """One line for an OSError that the user must fix on the machine (disk full, read-only, I/O error)."""
    reason = DISK_ERRORS.get(exc.errno or -1)
    if reason is None:
        return None
    where = f" while writing {exc.filename}" if exc.filename else ""
    return f"{reason}{where} ({exc.strerror or exc}); nothing was written: free space or choose another --out"
