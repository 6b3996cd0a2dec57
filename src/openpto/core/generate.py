"""The generation stack: a token-step generator -> ``StepRecord``s -> text.

Layers (the server, CLI, TUI, profiler and speculative decoder all use them):

- ``token_steps(model, prompt_ids, params, decode="auto")``: the token-step generator of one
  request, batch 1: sampled token ids, each read to the host, at most ``params.max_tokens``.
  ``decode`` picks a growing cache stepped eagerly or a static cache whose step replays as a
  CUDA graph (``core.static_decode``; "auto" takes the graph on CUDA models).
- ``core.steps``: ``RequestRules`` turns each id into a ``StepRecord`` (text delta, finish
  reason, timings, memory); end-of-sequence, stop strings and length limits live there only.
- ``generate_stream(model, tokenizer, prompt, params, ...)``: the two together, an iterator of
  ``StepRecord``. ``prompt`` is text (tokenized as is, special tokens added by the tokenizer) or
  token ids. ``collect(records) -> GenerationResult`` and ``generate_text`` give the text.
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from openpto.core.kvcache import forward_logits, new_cache
from openpto.core.sampling import SamplingParams, TokenConstraint, make_generator, sample_next
from openpto.core.static_decode import CAPACITY_STEP, DecodeMode, open_decoder
from openpto.core.steps import (
    FinishReason,
    MemoryProbe,
    RequestRules,
    StepRecord,
    stream_records,
)
from openpto.errors import UsageError

Prompt = str | Sequence[int] | torch.Tensor
#: new tokens a static cache first has room for beyond the prompt (it doubles when full)
FIRST_ROOM = CAPACITY_STEP

__all__ = ["FinishReason", "GenerationResult", "Prompt", "RequestRules", "StepRecord",
           "build_chat_prompt", "collect", "encode_prompt", "eos_ids", "generate_batch",
           "generate_batch_stream", "generate_stream", "generate_text", "left_pad",
           "model_device", "token_steps"]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """A record stream collected. ``token_ids`` are every sampled id (an end-of-sequence token
    included); ``tokens`` counts the completion's tokens (without it), as the server does."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    ttft_s: float
    elapsed_s: float
    step_s: list[float]
    tokens: int = 0
    peak_memory_bytes: int | None = None

    @property
    def tokens_per_second(self) -> float:
        """Sampled tokens over the wall time, prefill included."""
        return len(self.token_ids) / self.elapsed_s if self.elapsed_s > 0 else 0.0

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


@torch.inference_mode()
def token_steps(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    generator: torch.Generator | None = None,
    decode: DecodeMode = "auto",
    constraint: TokenConstraint | None = None,
) -> Iterator[int]:
    """Sampled token ids of one request (batch 1), each on the host, at most ``max_tokens``.

    ``constraint`` masks the logits before each token is sampled and is told the token after.

    The consumer stops pulling when the request's rules say it is done; closing the generator
    releases the decoder. ``decode`` picks the cache and step (``core.static_decode``).

    A static cache is sized for the prompt plus ``FIRST_ROOM`` new tokens, not for the whole
    ``max_tokens``: every step attends over all of it, and a server's default ``max_tokens`` of
    thousands would make each step of a short answer read a cache many times too long. When it
    is full, the request moves to a cache twice as large through one prefill of its tokens.
    """
    device = model_device(model)
    if generator is None and not params.greedy:
        generator = make_generator(params, device)
    ids = list(prompt_ids)  # on the host: a larger cache is filled from them
    budget = len(ids) + params.max_tokens
    decoder = open_decoder(model, budget, decode, capacity=len(ids) + FIRST_ROOM)
    history = torch.tensor([ids], dtype=torch.long, device=device)
    penalise = params.repetition_penalty != 1.0
    try:
        logits = decoder.prefill(history)
        for produced in range(1, params.max_tokens + 1):
            if constraint is not None:
                logits = logits.clone()  # a graph's output buffer is not ours to write
                constraint.mask_(logits)
            token = sample_next(logits, params, generator, history if penalise else None)
            token_id = int(token.item())  # the host read that times the step
            if constraint is not None:
                constraint.accept(token_id)
            yield token_id
            if produced == params.max_tokens:
                return
            ids.append(token_id)
            next_ids = token.view(1, 1)
            if penalise:
                history = torch.cat([history, next_ids], dim=1)
            capacity = getattr(decoder, "capacity", None)
            if capacity is not None and len(ids) > capacity:  # the step would write past it
                decoder.close()
                decoder = open_decoder(model, budget, decode, capacity=2 * capacity)
                logits = decoder.prefill(torch.tensor([ids], dtype=torch.long, device=device))
            else:
                logits = decoder.step(next_ids)
    finally:
        decoder.close()


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
    memory: MemoryProbe | None = None,
) -> Iterator[StepRecord]:
    """``token_steps`` through ``RequestRules``: one ``StepRecord`` per token (see the module
    docstring). ``memory`` is sampled after every token into ``StepRecord.memory_bytes``."""
    params = params or SamplingParams()
    ids = encode_prompt(tokenizer, prompt)
    eos = set() if ignore_eos else set(eos_token_ids or eos_ids(model, tokenizer))
    rules = RequestRules(tokenizer, ids, params, eos, skip_special_tokens=skip_special_tokens,
                         memory=memory)
    steps = token_steps(model, ids, params, generator=generator, decode=decode)
    return stream_records(steps, rules)


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
    tokens = 0
    peak: int | None = None
    last: StepRecord | None = None
    for record in records:
        texts.append(record.text)
        tokens += record.tokens
        if record.token_id is not None:
            ids.append(record.token_id)
            steps.append(record.step_s)
        if record.memory_bytes is not None:
            peak = max(peak or 0, record.memory_bytes)
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
        tokens=tokens,
        peak_memory_bytes=peak,
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
    rules = [
        RequestRules(tokenizer, r, p, eos, skip_special_tokens=skip_special_tokens)
        for r, p in zip(rows, per_row, strict=True)
    ]
    for row_rules in rules:
        row_rules.start()
    ids, mask, positions = left_pad(rows, pad_id, device)
    penalise = any(p.repetition_penalty != 1.0 for p in per_row)
    history, history_mask = ids, mask
    cache = new_cache(model)
    logits = forward_logits(model, ids, cache, attention_mask=mask, position_ids=positions)[:, -1]
    next_pos = positions[:, -1:] + 1
    for _ in range(max(p.max_tokens for p in per_row)):
        tokens = sample_next(
            logits, per_row, generators, history if penalise else None, history_mask
        )
        token_list = tokens.tolist()
        step: list[StepRecord | None] = []
        for row, token_id in enumerate(token_list):
            step.append(None if rules[row].done else rules[row].push(int(token_id)))
        yield step
        if all(r.done for r in rules):
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
