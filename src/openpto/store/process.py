"""Which process records a run, whether that process still exists, and its stop signals.

A run row carries its process's pid, host name and start time; a later command on the same host
closes the ``running`` rows whose process is gone (killed with SIGKILL, out of memory, a power
cut), so no run stays ``running`` for good.

SIGTERM is turned into ``Terminated`` (a ``KeyboardInterrupt``, so it unwinds like Ctrl-C and
the run is recorded ``failed``). While a run's final status is written, Ctrl-C and SIGTERM wait:
a burst of signals (a process group and its parent both forwarding one) would otherwise land in
the middle of that write and leave the row ``running``.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import psutil

# psutil reports start times rounded to the clock tick; two readings of one process can differ
# by a tick, never by a second.
_START_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class ProcessId:
    pid: int
    host: str
    started: float | None  # seconds since the epoch (psutil's create_time)


def current_process() -> ProcessId:
    return ProcessId(os.getpid(), socket.gethostname(), _create_time(os.getpid()))


def process_alive(pid: int, started: float | None = None) -> bool:
    """Whether ``pid`` is a live process on this host (not a zombie) that began at ``started``
    (when given): a pid the system has since handed to another process is not alive."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = process.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; it belongs to someone else
    return started is None or abs(created - started) <= _START_TOLERANCE_S


def _create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a running run is recorded as failed."""


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_held = 0  # depth of signals_held() in the main thread
_deferred: list[int] = []  # signals that arrived while held, raised on leaving
_received: list[int] = []  # every stop signal this process was sent


def _interrupt(signum: int) -> KeyboardInterrupt:
    if signum == signal.SIGTERM:
        return Terminated(f"terminated by signal {signum}")
    return KeyboardInterrupt()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    if _held:
        _deferred.append(signum)
        return
    raise _interrupt(signum)


def raise_on_stop_signals() -> None:
    """SIGTERM raises ``Terminated`` and Ctrl-C ``KeyboardInterrupt``, each held back while a
    final status is written (call from the main thread of a front end, e.g. the CLI)."""
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_signal)


def sigterm_received() -> bool:
    """Whether this process was sent SIGTERM (its exit status says so: 143)."""
    return signal.SIGTERM in _received


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back inside the block; one that arrived meanwhile is raised on
    leaving it. Blocking the signals covers handlers other than ours; the deferral covers a
    signal that arrived just before the block, whose Python handler has not run yet."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only
        return
    mask = hasattr(signal, "pthread_sigmask")
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS) if mask else None
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if not _held and _deferred:
            signum = _deferred[-1]
            _deferred.clear()
            raise _interrupt(signum)
