"""The bridge from an engine thread to the event loop: one request's ``StepRecord``s.

An engine (a scheduler thread owning the model) pushes the records that ``core.steps``'s
``RequestRules`` produce; the HTTP handler reads them on the asyncio loop. The engine must never
wait for a client, so the buffer between them is bounded by *coalescing*: when a slow reader lets
``max_pending`` records pile up, a new record is merged into the last pending one
(``StepRecord.merge``) instead of queueing another one. A slow client therefore receives bigger
chunks later; it never blocks the scheduler or the other sequences of its batch, and its memory is
bounded by its own ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from openpto.core.steps import StepRecord

#: called with the last record, the completion tokens and the inter-token gaps of the request
OnFinish = Callable[[StepRecord, int, list[float]], None]


class RequestStream:
    """Events of one request, written by an engine thread, read by one asyncio consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_pending: int = 64,
                 on_finish: OnFinish | None = None) -> None:
        self._loop = loop
        #: when the request arrived; the engine's rules report the queueing time from it
        self.arrived = time.perf_counter()
        # Called on the engine thread with the last record, the number of completion tokens and
        # the inter-token gaps, whether or not anyone still reads the stream (a vanished
        # client's request counts too).
        self._on_finish = on_finish
        self._tokens = 0
        self._gaps: list[float] = []
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: deque[StepRecord] = deque()
        self._ready = asyncio.Event()
        self._wake_scheduled = False
        self._cancelled = threading.Event()
        self.finished = False

    # -- engine side (any thread) ------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, event: StepRecord) -> None:
        """Never blocks: merges into the last pending record when the reader is behind."""
        self._tokens += event.tokens
        if event.token_id is not None and event.index > 0:
            self._gaps.append(event.step_s)
        if event.finish_reason is not None and self._on_finish is not None:
            self._on_finish(event, self._tokens, self._gaps)
        with self._lock:
            if len(self._pending) >= self._max_pending:
                self._pending[-1] = self._pending[-1].merge(event)
            else:
                self._pending.append(event)
            schedule = not self._wake_scheduled
            self._wake_scheduled = True
        if schedule:
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self._cancelled.set()

    # -- consumer side (the event loop) ------------------------------------------------------
    def _wake(self) -> None:
        with self._lock:
            self._wake_scheduled = False
        self._ready.set()

    def cancel(self) -> None:
        """The client is gone: the engine drops the sequence at its next token boundary."""
        self._cancelled.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    async def next_events(self, timeout: float | None = None) -> list[StepRecord]:
        """Wait for and return the records pushed since the last call ([] on timeout)."""
        if timeout is None:
            await self._ready.wait()
        else:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        self._ready.clear()
        with self._lock:
            events = list(self._pending)
            self._pending.clear()
        if any(e.finish_reason is not None for e in events):
            self.finished = True
        return events

    async def events(self) -> AsyncIterator[StepRecord]:
        while not self.finished:
            for event in await self.next_events():
                yield event
