"""What the ``gsr`` command makes of faults from outside: stop signals and a full disk.

A full disk shows up as an ``OSError`` (ENOSPC, EDQUOT) from Python's writes, and as
safetensors' own error (not an ``OSError``) from its writer; ``disk_full`` knows both,
and ``DiskFullError`` is what the command reports (exit 2, one line).

Stop signals as exceptions: SIGINT raises ``KeyboardInterrupt`` where the program
is, so ``finally`` blocks and context managers clean up; SIGTERM (``kill``, a batch
scheduler's stop) and SIGHUP (a closed terminal) end the process on the spot by
default, leaving whatever was half done. The ``gsr`` command raises ``Interrupted`` for
them too, and exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM) with one line.
"""

from __future__ import annotations

import errno
import signal
import threading
from contextlib import contextmanager

__all__ = ["STOP_SIGNALS", "Interrupted", "stop_signals_raise", "signal_of", "DiskFullError", "disk_full"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGHUP) raised where the program is, as SIGINT raises
    ``KeyboardInterrupt``; ``signum`` says which. A ``BaseException``, like
    ``KeyboardInterrupt``, so that libraries' ``except Exception`` do not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_of(error: BaseException) -> signal.Signals:
    """The signal behind an ``Interrupted`` or a ``KeyboardInterrupt``."""
    return signal.Signals(getattr(error, "signum", signal.SIGINT))


@contextmanager
def stop_signals_raise():
    """While inside, SIGTERM and SIGHUP raise ``Interrupted`` (in the main thread;
    elsewhere Python cannot install handlers, and nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class DiskFullError(OSError):
    """The disk filled while the checkpoint was written."""


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is the disk or quota filling: an OSError
    ENOSPC/EDQUOT, or safetensors' error carrying one (it is not an OSError)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(error) for s in ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")):
            return True
        error = error.__cause__ or error.__context__
    return False
