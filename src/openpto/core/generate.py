"""The token generator every front end consumes: prompt -> stream of ``StepRecord`` -> text.

Public interface (the server, CLI, TUI, profiler and speculative decoder build on these):

- ``StepRecord``: one generated token: ``token_id``, ``text`` (the new text this token completes;
  may be empty while a character or a possible stop string is incomplete), ``index`` (0-based
  among generated tokens), ``finish_reason`` (``None`` while running, ``"stop"`` for an end-of-
  sequence token or a stop string, ``"length"`` at ``max_tokens``), and timings measured with
  ``time.perf_counter`` after the token id reached the host (which synchronises the device):
  ``prompt_tokens``, ``ttft_s`` (start to first token), ``step_s`` (since the previous token; the
  TTFT for the first), ``elapsed_s`` and ``tokens_per_second`` (generated tokens / elapsed, prefill
  included). The record that carries ``finish_reason="stop"`` for an end-of-sequence token has that
  token's id and empty text; a stop string is cut from the text and never emitted.
- ``generate_stream(model, tokenizer, prompt, params, decode="auto")``: batch-1 generator over a
  KV cache; ``decode`` picks a growing cache stepped eagerly or a static cache whose step replays
  as a CUDA graph (``core.static_decode``; "auto" takes the graph on CUDA models).
  ``prompt`` is text (tokenized as is, special tokens added by the tokenizer) or token ids.
- ``generate_text(...) -> GenerationResult``: the stream collected (text, token ids, timings).
- ``generate_batch_stream(model, tokenizer, prompts, params)`` / ``generate_batch``: several
  prompts of different lengths in one batch: left padding, an attention mask and position ids that
  start at 0 in every row, so each row decodes as it would alone (greedy tokens are identical).
  The stream yields one list per step with a ``StepRecord`` per running row (``None`` once a row
  has finished). ``params`` may be one ``SamplingParams`` or one per prompt.
- ``build_chat_prompt(tokenizer, messages)``: the tokenizer's chat template with the generation
  prompt appended; ``encode_prompt`` turns text (raw or chat-formatted) into ids.
- ``eos_ids(model, tokenizer)``: the end-of-sequence ids of both tokenizer and generation config.

All functions are pure torch + a Hugging Face tokenizer; they run under ``torch.inference_mode``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

from openpto.core.detokenize import TextStream
from openpto.core.kvcache import forward_logits, new_cache
from openpto.core.sampling import SamplingParams, make_generator, sample_next
from openpto.core.static_decode import DecodeMode, open_decoder
from openpto.errors import UsageError

FinishReason = Literal["stop", "length"]
Prompt = str | Sequence[int] | torch.Tensor


@dataclasses.dataclass(frozen=True)
class StepRecord:
    token_id: int
    text: str
    index: int
    finish_reason: FinishReason | None
    prompt_tokens: int
    ttft_s: float
    step_s: float
    elapsed_s: float
    tokens_per_second: float


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    ttft_s: float
    elapsed_s: float
    step_s: list[float]

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first over the time they took (prefill excluded)."""
        decode = sum(self.step_s[1:])
        return (len(self.step_s) - 1) / decode if decode > 0 else 0.0


def build_chat_prompt(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """Format ``[{"role": ..., "content": ...}, ...]`` with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("this tokenizer has no chat template; use a raw prompt (--raw)")
    for message in messages:
        if "role" not in message or "content" not in message:
            raise UsageError(f"a chat message needs 'role' and 'content', got {dict(message)!r}")
    return str(
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    )


def encode_prompt(tokenizer: Any, prompt: Prompt, chat: bool = False) -> list[int]:
    """Token ids of a prompt; ``chat=True`` wraps text as one user message in the chat template."""
    if isinstance(prompt, torch.Tensor):
        return [int(t) for t in prompt.reshape(-1).tolist()]
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if tokenizer is None:
        raise UsageError("a text prompt needs a tokenizer")
    if chat:
        text = build_chat_prompt(tokenizer, [{"role": "user", "content": prompt}])
        # The template already holds any BOS token; adding special tokens again would double it.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise UsageError("the prompt is empty")
    return [int(t) for t in ids]


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    found: set[int] = set()
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    config = getattr(model, "generation_config", None)
    candidates.append(getattr(config, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return found


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Clock:
    """Timings of one request; every call happens after a host read of the new token id."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.start = time.perf_counter()
        self.last = self.start
        self.ttft = 0.0

    def record(
        self, token_id: int, text: str, index: int, finish: FinishReason | None
    ) -> StepRecord:
        now = time.perf_counter()
        if index == 0:
            self.ttft = now - self.start
        step, self.last = now - self.last, now
        elapsed = now - self.start
        return StepRecord(
            token_id=token_id,
            text=text,
            index=index,
            finish_reason=finish,
            prompt_tokens=self.prompt_tokens,
            ttft_s=self.ttft,
            step_s=step,
            elapsed_s=elapsed,
            tokens_per_second=(index + 1) / elapsed if elapsed > 0 else 0.0,
        )


class Finisher:
    """Decides, token by token, what text a request emits and whether it has finished.

    Shared by the plain, batched and speculative generators so that eos, stop strings and
    ``max_tokens`` behave the same everywhere.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos: Iterable[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.stream = TextStream(tokenizer, prompt_ids, params.stop, skip_special_tokens)
        self.params = params
        self.eos = frozenset(eos)
        self.count = 0
        self.done = False

    def push(self, token_id: int) -> tuple[str, FinishReason | None]:
        self.count += 1
        if token_id in self.eos:
            self.done = True
            return self.stream.finish(), "stop"
        text, stopped = self.stream.push(token_id)
        if stopped:
            self.done = True
            return text, "stop"
        if self.count >= self.params.max_tokens:
            self.done = True
            return text + self.stream.finish(), "length"
        return text, None


@torch.inference_mode()
def generate_stream(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    params: SamplingParams | None = None,
    *,
    eos_token_ids: Iterable[int] | None = None,
    ignore_eos: bool = False,
    generator: torch.Generator | None = None,
    skip_special_tokens: bool = True,
    decode: DecodeMode = "auto",
) -> Iterator[StepRecord]:
    """Generate one request token by token over a KV cache (see the module docstring).

    ``decode`` picks the cache and step (``core.static_decode``): ``"auto"`` replays a CUDA graph
    over a static cache on CUDA models and steps eagerly over a ``DynamicCache`` elsewhere.
    """
    params = params or SamplingParams()
    device = model_device(model)
    ids = encode_prompt(tokenizer, prompt)
    eos = set() if ignore_eos else set(eos_token_ids or eos_ids(model, tokenizer))
    if generator is None and not params.greedy:
        generator = make_generator(params, device)
    finisher = Finisher(tokenizer, ids, params, eos, skip_special_tokens)
    clock = _Clock(len(ids))
    decoder = open_decoder(model, len(ids) + params.max_tokens, decode)
    history = torch.tensor([ids], dtype=torch.long, device=device)
    penalise = params.repetition_penalty != 1.0
    try:
        logits = decoder.prefill(history)
        for index in range(params.max_tokens):
            token = sample_next(logits, params, generator, history if penalise else None)
            token_id = int(token.item())
            text, finish = finisher.push(token_id)
            yield clock.record(token_id, text, index, finish)
            if finish is not None:
                return
            next_ids = token.view(1, 1)
            if penalise:
                history = torch.cat([history, next_ids], dim=1)
            logits = decoder.step(next_ids)
    finally:
        decoder.close()


def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: Prompt,
    params: SamplingParams | None = None,
    **kwargs: Any,
) -> GenerationResult:
    """``generate_stream`` collected into one result."""
    return collect(generate_stream(model, tokenizer, prompt, params, **kwargs))


def collect(records: Iterable[StepRecord]) -> GenerationResult:
    texts: list[str] = []
    ids: list[int] = []
    steps: list[float] = []
    last: StepRecord | None = None
    for record in records:
        texts.append(record.text)
        ids.append(record.token_id)
        steps.append(record.step_s)
        last = record
    if last is None:
        return GenerationResult("", [], None, 0, 0.0, 0.0, [])
    return GenerationResult(
        text="".join(texts),
        token_ids=ids,
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        ttft_s=last.ttft_s,
        elapsed_s=last.elapsed_s,
        step_s=steps,
    )


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad id lists: ``(input_ids, attention_mask, position_ids)``, each [B, max_len].

    Position ids count real tokens only, so every row's first real token sits at position 0
    exactly as it would without padding.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


@torch.inference_mode()
def generate_batch_stream(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    *,
    eos_token_ids: Iterable[int] | None = None,
    ignore_eos: bool = False,
    skip_special_tokens: bool = True,
) -> Iterator[list[StepRecord | None]]:
    """Generate several prompts together (see the module docstring)."""
    if not prompts:
        raise UsageError("generate_batch needs at least one prompt")
    if params is None or isinstance(params, SamplingParams):
        per_row = [params or SamplingParams()] * len(prompts)
    else:
        per_row = list(params)
        if len(per_row) != len(prompts):
            raise UsageError(f"{len(per_row)} SamplingParams for {len(prompts)} prompts")
    device = model_device(model)
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    eos = set() if ignore_eos else set(eos_token_ids or eos_ids(model, tokenizer))
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (min(eos) if eos else 0)
    generators = [None if p.greedy else make_generator(p, device) for p in per_row]
    finishers = [
        Finisher(tokenizer, r, p, eos, skip_special_tokens)
        for r, p in zip(rows, per_row, strict=True)
    ]
    clocks = [_Clock(len(r)) for r in rows]
    ids, mask, positions = left_pad(rows, pad_id, device)
    penalise = any(p.repetition_penalty != 1.0 for p in per_row)
    history, history_mask = ids, mask
    cache = new_cache(model)
    logits = forward_logits(model, ids, cache, attention_mask=mask, position_ids=positions)[:, -1]
    next_pos = positions[:, -1:] + 1
    for index in range(max(p.max_tokens for p in per_row)):
        tokens = sample_next(
            logits, per_row, generators, history if penalise else None, history_mask
        )
        token_list = tokens.tolist()
        step: list[StepRecord | None] = []
        for row, token_id in enumerate(token_list):
            finisher = finishers[row]
            if finisher.done:
                step.append(None)
                continue
            text, finish = finisher.push(int(token_id))
            step.append(clocks[row].record(int(token_id), text, index, finish))
        yield step
        if all(f.done for f in finishers):
            return
        next_ids = tokens.view(-1, 1)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        if penalise:
            history = torch.cat([history, next_ids], dim=1)
            history_mask = mask
        logits = forward_logits(
            model, next_ids, cache, attention_mask=mask, position_ids=next_pos
        )[:, -1]
        next_pos = next_pos + 1


def generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    **kwargs: Any,
) -> list[GenerationResult]:
    """``generate_batch_stream`` collected into one result per prompt."""
    per_row: list[list[StepRecord]] = [[] for _ in prompts]
    for step in generate_batch_stream(model, tokenizer, prompts, params, **kwargs):
        for row, record in enumerate(step):
            if record is not None:
                per_row[row].append(record)
    return [collect(records) for records in per_row]
