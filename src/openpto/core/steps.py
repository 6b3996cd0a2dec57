"""One record per generated token, and the rules that decide what each token emits.

Every generator -- the plain and static/graph decoders, the batched decoder, the speculative
decoder, the server's continuous-batching scheduler, the llama.cpp and MLX engines -- produces
token ids. A ``RequestRules`` object per request turns each id into a ``StepRecord``; this
module is the only place where end-of-sequence, stop strings, length limits, detokenization and
timings are decided:

- end of sequence: a token in ``eos`` finishes the request with ``"stop"``; its record carries
  the id, any text still held back, and ``tokens=0`` (the token is not part of the completion).
- stop strings: text is cut just before the first stop string, which is never emitted; a tail
  that could still become one is held back until it cannot (``core.detokenize.TextStream``).
  Finishes with ``"stop"``.
- length: the ``params.max_tokens``-th token, or the token that fills ``context_length`` (prompt
  plus generated), finishes with ``"length"`` and releases the text held back.
- ``end(reason)``: a record without a token that ends the request -- ``"cancelled"`` (the client
  left), ``"error"`` (with ``error``), or ``"length"`` when a backend stops on its own.

Timings are ``time.perf_counter`` readings taken in ``push``, which every caller invokes right
after the token id reached the host (a read that waits for the device, so CUDA work is
included): ``ttft_s`` is from ``start()`` (prefill begins) to the first token, ``step_s`` since
the previous token (the TTFT for the first), ``elapsed_s`` since ``start()``, ``queued_s`` from
``arrived`` (when a server received the request) to ``start()``, ``tokens_per_second`` is
generated tokens over ``elapsed_s`` (prefill included). ``memory_bytes`` is what the optional
``memory`` probe returned after the token (``None`` without one).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, Literal

from openpto.core.detokenize import TextStream
from openpto.core.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error"]
MemoryProbe = Callable[[], int]


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """One generated token (or the tokenless record that ends a request; ``token_id`` None).

    ``index`` is the token's 0-based position among the generated tokens (for a tokenless record:
    how many came before it). ``tokens`` is how many completion tokens the record carries: 1, 0
    for an end-of-sequence token or a tokenless record, more once a slow reader's records have
    been merged (``merge``). ``finish_reason`` is ``None`` until the last record.
    """

    token_id: int | None = None
    text: str = ""
    index: int = 0
    tokens: int = 0
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    queued_s: float = 0.0
    ttft_s: float = 0.0
    step_s: float = 0.0
    elapsed_s: float = 0.0
    tokens_per_second: float = 0.0
    memory_bytes: int | None = None
    error: str | None = None

    @property
    def generated(self) -> int:
        """Tokens sampled so far, this one included (end-of-sequence tokens too)."""
        return self.index + (self.token_id is not None)

    @property
    def prefill_seconds(self) -> float:
        return self.ttft_s

    @property
    def decode_seconds(self) -> float:
        return max(self.elapsed_s - self.ttft_s, 0.0) if self.generated else 0.0

    @property
    def total_seconds(self) -> float:
        """From arrival (or start) to this record."""
        return self.queued_s + self.elapsed_s

    def merge(self, later: StepRecord) -> StepRecord:
        """``later`` with this record's text and tokens in front (a slow reader's backlog)."""
        return dataclasses.replace(
            later,
            text=self.text + later.text,
            tokens=self.tokens + later.tokens,
            prompt_tokens=later.prompt_tokens or self.prompt_tokens,
        )


class RequestRules:
    """What one request emits, token by token (see the module docstring)."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos: Iterable[int] = (),
        *,
        skip_special_tokens: bool = True,
        context_length: int | None = None,
        arrived: float | None = None,
        memory: MemoryProbe | None = None,
    ) -> None:
        self.text = TextStream(tokenizer, prompt_ids, params.stop, skip_special_tokens)
        self.params = params
        self.eos = frozenset(eos)
        self.prompt_tokens = len(prompt_ids)
        self.context_length = context_length
        self.memory = memory
        self.arrived = arrived
        self.started: float | None = None
        self.last = 0.0
        self.ttft = 0.0
        self.count = 0
        self.finish_reason: FinishReason | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def start(self) -> None:
        """Prefill begins now (idempotent: a request moved between decoders keeps its clock)."""
        if self.started is None:
            self.started = self.last = time.perf_counter()

    def push(self, token_id: int) -> StepRecord:
        """The record of one sampled token (call it as soon as the id is on the host)."""
        now = time.perf_counter()
        if self.done:
            raise RuntimeError(f"the request has already finished ({self.finish_reason})")
        self.start()
        index = self.count
        self.count += 1
        tokens = 1
        finish: FinishReason | None = None
        if token_id in self.eos:
            text, finish, tokens = self.text.finish(), "stop", 0
        else:
            text, stopped = self.text.push(token_id)
            if stopped:
                finish = "stop"
            elif self.count >= self.params.max_tokens or self._context_full():
                text, finish = text + self.text.finish(), "length"
        if index == 0:
            self.ttft = now - self._started
        step, self.last = now - self.last, now
        self.finish_reason = finish
        return self._record(now, int(token_id), text, index, tokens, finish, step)

    def end(self, reason: FinishReason, error: str | None = None) -> StepRecord:
        """A tokenless last record; ``"length"``/``"stop"`` release the text still held back."""
        now = time.perf_counter()
        text = self.text.finish() if reason in ("length", "stop") and not self.done else ""
        self.finish_reason = reason
        return self._record(now, None, text, self.count, 0, reason, 0.0, error)

    def _context_full(self) -> bool:
        return (self.context_length is not None
                and self.prompt_tokens + self.count >= self.context_length)

    @property
    def _started(self) -> float:
        assert self.started is not None
        return self.started

    def _record(self, now: float, token_id: int | None, text: str, index: int, tokens: int,
                finish: FinishReason | None, step: float, error: str | None = None) -> StepRecord:
        started = self.started if self.started is not None else now
        elapsed = now - started
        generated = index + (token_id is not None)
        return StepRecord(
            token_id=token_id,
            text=text,
            index=index,
            tokens=tokens,
            finish_reason=finish,
            prompt_tokens=self.prompt_tokens,
            queued_s=started - self.arrived if self.arrived is not None else 0.0,
            ttft_s=self.ttft,
            step_s=step,
            elapsed_s=elapsed,
            tokens_per_second=generated / elapsed if elapsed > 0 else 0.0,
            memory_bytes=self.memory() if self.memory is not None else None,
            error=error,
        )


def stream_records(
    token_ids: Iterable[int], rules: RequestRules
) -> Generator[StepRecord, None, None]:
    """Records of ``token_ids`` until the rules finish the request; closes the token generator.

    The clock starts before the first id is pulled, so a lazy generator's prefill is timed.
    A generator that runs out before the rules finish ends with ``"length"``.
    """
    iterator = iter(token_ids)
    try:
        rules.start()
        for token_id in iterator:
            record = rules.push(token_id)
            yield record
            if record.finish_reason is not None:
                return
        if not rules.done:
            yield rules.end("length")
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
