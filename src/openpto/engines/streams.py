"""Events of one generation request and the bridge from an engine thread to the event loop.

An engine (a scheduler thread owning the model) pushes ``StreamEvent``s; the HTTP handler reads
them on the asyncio loop. The engine must never wait for a client, so the buffer between them is
bounded by *coalescing*: when a slow reader lets ``max_pending`` events pile up, new text is merged
into the last pending event instead of queueing another one. A slow client therefore receives
bigger chunks later; it never blocks the scheduler or the other sequences of its batch, and its
memory is bounded by its own ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable


@dataclasses.dataclass
class Timings:
    """When things happened to one sequence (``time.perf_counter()`` seconds)."""

    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    started: float | None = None  # prefill began (left the waiting queue)
    first_token: float | None = None
    finished: float | None = None
    token_gaps: list[float] = dataclasses.field(default_factory=list)  # inter-token latencies

    @property
    def prefill_seconds(self) -> float:
        if self.started is None or self.first_token is None:
            return 0.0
        return self.first_token - self.started

    @property
    def decode_seconds(self) -> float:
        if self.first_token is None or self.finished is None:
            return 0.0
        return self.finished - self.first_token

    @property
    def total_seconds(self) -> float:
        return (self.finished or time.perf_counter()) - self.arrived


@dataclasses.dataclass
class StreamEvent:
    """New output of one sequence. The last event has ``finish_reason`` set.

    ``finish_reason`` is ``stop`` (end-of-sequence token or stop string), ``length``
    (``max_tokens`` or the context window), ``cancelled`` (the client left) or ``error``.
    """

    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    timings: Timings | None = None  # set on the last event
    draft_tokens: int = 0  # speculative decoding: proposed and accepted draft tokens
    accepted_tokens: int = 0

    def merge(self, later: StreamEvent) -> StreamEvent:
        return StreamEvent(
            text=self.text + later.text,
            tokens=self.tokens + later.tokens,
            finish_reason=later.finish_reason,
            error=later.error,
            prompt_tokens=later.prompt_tokens or self.prompt_tokens,
            timings=later.timings or self.timings,
            draft_tokens=self.draft_tokens + later.draft_tokens,
            accepted_tokens=self.accepted_tokens + later.accepted_tokens,
        )


class RequestStream:
    """Events of one request, written by an engine thread, read by one asyncio consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_pending: int = 64,
                 on_finish: Callable[[StreamEvent, int], None] | None = None) -> None:
        self._loop = loop
        # Called on the engine thread with the last event and the number of generated tokens,
        # whether or not anyone still reads the stream (a vanished client's request counts too).
        self._on_finish = on_finish
        self._tokens = 0
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: deque[StreamEvent] = deque()
        self._ready = asyncio.Event()
        self._wake_scheduled = False
        self._cancelled = threading.Event()
        self.finished = False

    # -- engine side (any thread) ------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def push(self, event: StreamEvent) -> None:
        """Never blocks: merges into the last pending event when the reader is behind."""
        self._tokens += event.tokens
        if event.finish_reason is not None and self._on_finish is not None:
            self._on_finish(event, self._tokens)
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

    async def next_events(self, timeout: float | None = None) -> list[StreamEvent]:
        """Wait for and return the events pushed since the last call ([] on timeout)."""
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

    async def events(self) -> AsyncIterator[StreamEvent]:
        while not self.finished:
            for event in await self.next_events():
                yield event
