"""Which process records a run, and whether that process still exists.

A run row carries its process's pid, host name and start time; a later command on the same host
closes the ``running`` rows whose process is gone (killed with SIGKILL, out of memory, a power
cut), so no run stays ``running`` for good.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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
