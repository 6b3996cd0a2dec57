"""What both API families share: model names, limits, sampling, running requests, recording.

Routes translate their wire format into calls here and the results back; nothing here knows
about OpenAI or Ollama field names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request

from openpto.core.sampling import SamplingParams, TokenConstraint
from openpto.core.steps import StepRecord
from openpto.engines.engine import Embeddings, Engine
from openpto.engines.streams import RequestStream
from openpto.errors import OptError
from openpto.serving.errors import APIError
from openpto.serving.metrics import ServerMetrics
from openpto.serving.settings import ServerSettings


@dataclasses.dataclass
class Completion:
    """One finished sequence, collected; ``timings`` is its last record (durations)."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: StepRecord


class Service:
    def __init__(self, settings: ServerSettings, engine: Engine, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.started = time.time()
        self.load_seconds = 0.0
        self.load_error: str | None = None
        self._store: Any = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None

    # -- names and limits ------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.settings.model_id or self.engine.info.id

    def check_model(self, name: str) -> None:
        """404 unless ``name`` is this server's model (Ollama clients may add ``:latest``)."""
        self.check_ready()
        if name not in (self.model_id, f"{self.model_id}:latest"):
            raise APIError(404, f"model {name!r} is not served here; this server serves "
                                f"{self.model_id!r}", "model_not_found", "model")

    def check_ready(self) -> None:
        if not self.engine.ready:
            raise APIError(503, "the model is still loading", "model_loading")

    def sampling(
        self,
        *,
        max_tokens: int | None,
        prompt_tokens: int,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
    ) -> SamplingParams:
        limit = self.settings.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's limit of "
                                f"{limit}", "max_tokens_too_large", "max_tokens")
        room = self.engine.info.context_length - prompt_tokens
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_tokens} tokens; the model's context "
                                f"holds {self.engine.info.context_length}",
                           "context_length_exceeded", "messages")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 16:
            raise APIError(400, f"at most 16 stop strings, got {len(stops)}", None, "stop")
        try:
            return SamplingParams(
                temperature=1.0 if temperature is None else temperature,
                top_p=1.0 if top_p is None else top_p,
                top_k=top_k or 0,
                min_p=min_p or 0.0,
                repetition_penalty=repetition_penalty or 1.0,
                seed=seed,
                max_tokens=min(max_tokens or limit, room),
                stop=tuple(s for s in stops if s),
            )
        except OptError as exc:
            raise APIError(400, str(exc)) from exc

    def prompt_ids(self, text: str) -> list[int]:
        ids = self.engine.tokenize(text)
        if not ids:
            raise APIError(400, "the prompt is empty", "empty_prompt", "prompt")
        return ids

    def check_token_ids(self, ids: Sequence[int], param: str) -> list[int]:
        """Token ids sent by a client: an id outside the vocabulary would fail the whole batch
        it joins, so it is refused here."""
        vocab = self.engine.info.vocab_size
        bad = [t for t in ids if t < 0 or (vocab and t >= vocab)]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                           "invalid_token_id", param)
        if not ids:
            raise APIError(400, "the prompt is empty", "empty_prompt", param)
        return list(ids)

    # -- running -----------------------------------------------------------------------------
    def start(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        self.check_ready()
        stream = RequestStream(asyncio.get_running_loop(), self.settings.stream_buffer,
                               on_finish=self.metrics.observe_finished)
        self.engine.submit(prompt_ids, params, stream)
        return stream

    def start_n(self, prompt_ids: list[int], params: SamplingParams, n: int) -> list[RequestStream]:
        """``n`` independent sequences; with a seed, choice i uses seed + i so they differ."""
        if n > self.settings.max_n:
            raise APIError(400, f"n is {n}, above this server's limit of {self.settings.max_n}",
                           None, "n")
        return [self.start(prompt_ids, params if params.seed is None or i == 0
                           else params.replace(seed=params.seed + i)) for i in range(n)]

    def start_constrained(self, prompt_ids: list[int], params: SamplingParams,
                          constraints: Sequence[TokenConstraint | None]) -> list[RequestStream]:
        """``start_n`` with one decoding constraint (a grammar's matcher, or None) per choice."""
        if len(constraints) > self.settings.max_n:
            raise APIError(400, f"n is {len(constraints)}, above this server's limit of "
                                f"{self.settings.max_n}", None, "n")
        self.check_ready()
        streams = []
        for i, constraint in enumerate(constraints):
            stream = RequestStream(asyncio.get_running_loop(), self.settings.stream_buffer,
                                   on_finish=self.metrics.observe_finished)
            seeded = (params if params.seed is None or i == 0
                      else params.replace(seed=params.seed + i))
            self.engine.submit(prompt_ids, seeded, stream, constraint)
            streams.append(stream)
        return streams

    async def events(self, stream: RequestStream,
                     request: Request | None = None) -> AsyncIterator[StepRecord]:
        """The stream's events; the sequence is cancelled if the consumer stops early or, for a
        non-streaming request, if the client disconnects while it waits."""
        try:
            while not stream.finished:
                events = await stream.next_events(timeout=None if request is None else 0.5)
                if not events and request is not None and await request.is_disconnected():
                    return
                for event in events:
                    if event.finish_reason == "error":
                        raise APIError(500, f"generation failed: {event.error}",
                                       "generation_error")
                    yield event
        finally:
            if not stream.finished:
                stream.cancel()

    async def merged(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, StepRecord]]:
        """Events of several streams as they come, tagged with the stream's index."""
        iterators = [self.events(s).__aiter__() for s in streams]
        pending = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(iterators)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index = pending.pop(task)
                    try:
                        event = task.result()
                    except StopAsyncIteration:
                        continue
                    pending[asyncio.ensure_future(iterators[index].__anext__())] = index
                    yield index, event
        finally:
            # No awaiting here: inside a cancelled task group every await raises again.
            for task in pending:
                task.cancel()
            for stream in streams:
                if not stream.finished:
                    stream.cancel()

    async def collect(self, stream: RequestStream, request: Request | None = None) -> Completion:
        parts: list[str] = []
        tokens = 0
        last = StepRecord()
        async for event in self.events(stream, request):
            parts.append(event.text)
            tokens += event.tokens
            last = event
        if last.finish_reason is None:  # the client left; nobody reads this
            raise APIError(499, "client disconnected")
        return Completion("".join(parts), last.finish_reason, last.prompt_tokens, tokens, last)

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        self.check_ready()
        if len(texts) > self.settings.max_prompt_items:
            raise APIError(400, f"at most {self.settings.max_prompt_items} inputs per request",
                           None, "input")
        return await asyncio.wrap_future(self.engine.embed(texts))

    # -- recording -----------------------------------------------------------------------------
    async def log_prompt(self, prompt: str, completion: Completion,
                         conversation_id: str | None = None) -> None:
        """Store the pair in the ``prompts`` table when ``--log-prompts`` is on."""
        if not self.settings.log_prompts:
            return
        from openpto.store.db import now_iso

        row = {
            "conversation_id": conversation_id or uuid.uuid4().hex,
            "model": self.model_id,
            "prompt": prompt,
            "response": completion.text,
            "tokens_in": completion.prompt_tokens,
            "tokens_out": completion.completion_tokens,
            "duration_ms": completion.timings.total_seconds * 1000.0,
            "created_at": now_iso(),
            "source": "server",
        }
        if self._writer is None:
            # sqlite connections belong to the thread that opened them: one writer thread.
            self._writer = concurrent.futures.ThreadPoolExecutor(1, "opt-prompt-log")
        await asyncio.wrap_future(self._writer.submit(self._insert, row))

    def _insert(self, row: dict[str, Any]) -> None:
        if self._store is None:
            from openpto.store import Store

            self._store = Store()
        self._store.insert("prompts", row)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
