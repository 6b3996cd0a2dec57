"""Continuous batching for the torch backend: one scheduler thread owns the model.

Every sequence's bookkeeping -- detokenization, stop strings, end-of-sequence, length limits,
timings -- is a ``core.steps.RequestRules``, the object ``opt generate`` uses; the scheduler only
decides which decoder produces the next token id of each sequence.

A lone request (nothing running, nothing else waiting) is decoded by the token-step generator of
``opt generate`` itself (``core.generate.token_steps``, on CUDA the static-cache / CUDA-graph
decode of ``core.static_decode``), or by ``core.speculative.speculative_steps`` when the engine
has a draft. It is checked between tokens: when another request arrives, the lone run stops at
that token boundary and the sequence joins the batch through a prefill of its prompt plus the
tokens generated so far. On CUDA a sequence left alone in the batch (the others finished) moves
back to the lone decoder the same way.

The batch: one ``DynamicCache`` whose rows are *left-padded* to a common length, with a 2-D
attention mask (0 on padding) and per-row position ids that count real tokens only, so each row
attends and rotates exactly as it would alone (``core.generate.left_pad``). Padded keys and
values are zeros that the mask hides; RoPE is applied before keys are cached, so shifting a row
to the right inside the cache does not change what it attends to. Batched steps run eagerly (no
static cache, no graph: the batch changes shape at every admission and departure).

The loop, at every token boundary:

1. take new work from the inbox (requests, embedding jobs; embeddings run at once);
2. drop sequences whose client has gone (their ``RequestStream`` was cancelled);
3. a lone request goes to the lone decoder (above);
4. admit waiting requests up to ``max_batch``: prefill them together (left-padded among
   themselves), sample their first token, then splice their cache rows into the running cache
   (the shorter side is left-padded to the longer);
5. run one decode step for every running row, sample with ``core.sampling.sample_next`` (each
   row with its own params and generator), and push each token through the row's rules;
   a row with a ``TokenConstraint`` (a grammar) has its own logits masked before sampling and
   its matcher advanced after; the other rows' logits are left exactly as they were;
6. remove finished rows and trim cache columns that have become padding in every row.

The scheduler never waits for a client: records go to bounded, coalescing ``RequestStream``s.
A long prompt's prefill delays the next decode step of the running rows by its duration (no
chunked prefill); that is the price of keeping one simple padded batch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from openpto.core.generate import left_pad, token_steps
from openpto.core.kvcache import forward_logits, new_cache
from openpto.core.sampling import SamplingParams, TokenConstraint, make_generator, sample_next
from openpto.core.static_decode import DecodeMode
from openpto.core.steps import FinishReason, RequestRules
from openpto.engines.engine import Embeddings, EngineStats
from openpto.engines.streams import RequestStream
from openpto.errors import OptError

#: Starts speculative decoding of one sequence: (context ids, params, generator) -> (token ids,
#: statistics with ``drafted`` and ``accepted`` counts filled as the ids are consumed).
SpeculativeFactory = Callable[[list[int], SamplingParams, "torch.Generator | None"],
                              "tuple[Iterator[int], Any]"]


@dataclasses.dataclass
class _Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    rules: RequestRules
    generator: torch.Generator | None
    constraint: TokenConstraint | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    position: int = 0  # position id of the next token fed to the model (= tokens in the cache)
    done: bool = False

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.generated


class BatchScheduler:
    """Owns ``model``; ``submit`` and ``embed`` may be called from any thread."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        eos: set[int],
        max_batch: int = 8,
        context_length: int = 2048,
        speculative: SpeculativeFactory | None = None,
        threads: int | None = None,
        decode: DecodeMode = "auto",
        lone_after_batch: bool | None = None,
    ) -> None:
        self.model = model
        self.threads = threads
        self.tokenizer = tokenizer
        self.eos = eos
        self.max_batch = max_batch
        self.context_length = context_length
        self.speculative = speculative
        self.decode: DecodeMode = decode
        self.device = next(model.parameters()).device
        # Moving the last row of a batch back to the lone decoder costs one prefill of its
        # context; it pays where the lone decoder is a CUDA graph, not on an eager CPU step.
        self.lone_after_batch = (self.device.type == "cuda" and decode != "dynamic"
                                 if lone_after_batch is None else lone_after_batch)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (min(eos) if eos else 0)
        self._inbox: queue.Queue[_Sequence | Callable[[], None] | None] = queue.Queue()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._draft_tokens = 0
        self._accepted_tokens = 0
        self._thread = threading.Thread(target=self._run, name="opt-batch-scheduler", daemon=True)
        self._stopping = False
        self._thread.start()

    # -- any thread ----------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: RequestStream,
               constraint: TokenConstraint | None = None) -> None:
        generator = None if params.greedy else make_generator(params, self.device)
        rules = RequestRules(self.tokenizer, prompt_ids, params, self.eos,
                             context_length=self.context_length, arrived=stream.arrived)
        self._inbox.put(_Sequence(list(prompt_ids), params, stream, rules, generator,
                                  constraint))

    def embed(self, texts: Sequence[str]) -> concurrent.futures.Future[Embeddings]:
        future: concurrent.futures.Future[Embeddings] = concurrent.futures.Future()

        def job() -> None:
            try:
                future.set_result(self._embed(list(texts)))
            except Exception as exc:  # reported by the waiting request
                future.set_exception(exc)

        self._inbox.put(job)
        return future

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._active),
            waiting=len(self._waiting) + self._inbox.qsize(),
            draft_tokens=self._draft_tokens,
            accepted_tokens=self._accepted_tokens,
        )

    def close(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    # -- the scheduler thread ------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            # OpenMP thread counts belong to the calling thread: set it where the model runs.
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while not self._stopping:
                self._take_inbox(block=not self._active and not self._waiting)
                try:
                    self._drop_cancelled()
                    if self._alone():
                        self._decode_alone(self._waiting.popleft())
                        continue
                    self._admit()
                    if self._active:
                        self._decode_step()
                        self._leave_batch_if_alone()
                except Exception as exc:  # the batch is lost, the server is not
                    self._fail_all(exc)
        for seq in [*self._active, *self._waiting]:
            self._finish(seq, "cancelled")

    def _take_inbox(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                if block and not self._stopping:
                    continue
                return
            block = False
            if item is None:
                self._stopping = True
                return
            if isinstance(item, _Sequence):
                self._waiting.append(item)
            else:
                item()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.stream.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        if any(s.stream.cancelled for s in self._active):
            for seq in self._active:
                if seq.stream.cancelled:
                    self._finish(seq, "cancelled")
            self._remove_done()

    def _admit(self) -> None:
        room = self.max_batch - len(self._active)
        if room <= 0 or not self._waiting:
            return
        new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        for seq in new:
            seq.rules.start()
        try:
            ids, mask, positions = left_pad([s.context for s in new], self.pad_id, self.device)
            cache = new_cache(self.model)
            logits = forward_logits(self.model, ids, cache, attention_mask=mask,
                                    position_ids=positions)[:, -1]
        except Exception as exc:  # only the newcomers fail; the running batch is untouched
            for seq in new:
                self._finish(seq, "error", _describe(exc))
            return
        for seq in new:
            seq.position = len(seq.context)
        self._splice(cache, mask)
        self._active.extend(new)
        self._accept_tokens(new, self._sample(new, logits))

    def _decode_step(self) -> None:
        assert self._mask is not None
        rows = self._active
        ids = torch.tensor([[s.generated[-1]] for s in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)
        positions = torch.tensor([[s.position] for s in rows], dtype=torch.long, device=self.device)
        logits = forward_logits(self.model, ids, self._cache, attention_mask=mask,
                                position_ids=positions)[:, -1]
        self._mask = mask
        for seq in rows:
            seq.position += 1
        self._accept_tokens(rows, self._sample(rows, logits))

    def _sample(self, rows: list[_Sequence], logits: torch.Tensor) -> list[int]:
        constrained = [i for i, s in enumerate(rows) if s.constraint is not None]
        if constrained:
            logits = logits.clone()
            for i in constrained:
                rows[i].constraint.mask_(logits[i : i + 1])  # type: ignore[union-attr]
        tokens = self._sample_masked(rows, logits)
        for i in constrained:
            rows[i].constraint.accept(tokens[i])  # type: ignore[union-attr]
        return tokens

    def _sample_masked(self, rows: list[_Sequence], logits: torch.Tensor) -> list[int]:
        params = [s.params for s in rows]
        if all(p.greedy and p.repetition_penalty == 1.0 for p in params):
            return [int(t) for t in sample_next(logits, params[0]).tolist()]
        previous = previous_mask = None
        if any(p.repetition_penalty != 1.0 for p in params):
            previous, previous_mask, _ = left_pad([s.context for s in rows], self.pad_id,
                                                  self.device)
        tokens = sample_next(logits, params, [s.generator for s in rows], previous, previous_mask)
        return [int(t) for t in tokens.tolist()]

    def _accept_tokens(self, rows: list[_Sequence], tokens: list[int]) -> None:
        for seq, token in zip(rows, tokens, strict=True):
            self._accept(seq, token)
        self._remove_done()

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Push one sampled token of ``seq`` through its rules to its stream."""
        if seq.stream.cancelled:
            self._finish(seq, "cancelled")
            return
        seq.generated.append(token)
        record = seq.rules.push(token)
        seq.stream.push(record)
        seq.done = record.finish_reason is not None

    def _finish(self, seq: _Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End ``seq`` without a token (cancelled, failed, or its decoder ran out)."""
        if seq.done:
            return
        seq.done = True
        seq.stream.push(seq.rules.end(reason, error))

    def _fail_all(self, exc: Exception) -> None:
        for seq in self._active:
            self._finish(seq, "error", _describe(exc))
        self._active, self._cache, self._mask = [], None, None

    # -- the shared cache ----------------------------------------------------------------------
    def _splice(self, cache: Any, mask: torch.Tensor) -> None:
        """Append the rows of ``cache``/``mask`` to the running batch, left-padding the shorter."""
        if self._mask is None or not self._active:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        merged = new_cache(self.model)
        for index, (old, add) in enumerate(zip(_layers(self._cache), _layers(cache), strict=True)):
            keys = torch.cat([_pad_left(old[0], width, -2), _pad_left(add[0], width, -2)])
            values = torch.cat([_pad_left(old[1], width, -2), _pad_left(add[1], width, -2)])
            merged.update(keys, values, index)
        self._cache = merged
        self._mask = torch.cat([_pad_left(self._mask, width, -1), _pad_left(mask, width, -1)])

    def _remove_done(self) -> None:
        keep = [i for i, s in enumerate(self._active) if not s.done]
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._mask is not None
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, rows)
        # Columns that are padding in every remaining row hold nothing: cut them off the left.
        start = int(mask.any(dim=0).long().argmax().item())
        trimmed = new_cache(self.model)
        for index, (keys, values) in enumerate(_layers(self._cache)):
            trimmed.update(keys.index_select(0, rows)[..., start:, :].contiguous(),
                           values.index_select(0, rows)[..., start:, :].contiguous(), index)
        self._cache, self._mask = trimmed, mask[:, start:]

    # -- a lone request: the single-stream decoder of ``opt generate`` (or the speculative one) --
    def _alone(self) -> bool:
        return not self._active and len(self._waiting) == 1 and self._inbox.empty()

    def _leave_batch_if_alone(self) -> None:
        if (self.lone_after_batch and len(self._active) == 1 and not self._waiting
                and self._inbox.empty()):
            self._waiting.append(self._active.pop())
            self._cache, self._mask = None, None

    def _decode_alone(self, seq: _Sequence) -> None:
        seq.rules.start()
        remaining = seq.params.replace(max_tokens=seq.params.max_tokens - len(seq.generated))
        stats: Any = None
        # A draft proposes tokens the grammar has not seen: constrained requests decode plainly.
        if self.speculative is not None and seq.constraint is None:
            tokens, stats = self.speculative(seq.context, remaining, seq.generator)
            drafted, accepted = stats.drafted, stats.accepted
        else:
            tokens = token_steps(self.model, seq.context, remaining, generator=seq.generator,
                                 decode=self.decode, constraint=seq.constraint)
        try:
            self._pull_alone(seq, tokens)
        except Exception as exc:  # the lone request fails, the server does not
            self._finish(seq, "error", _describe(exc))
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
            if stats is not None:
                self._draft_tokens += stats.drafted - drafted
                self._accepted_tokens += stats.accepted - accepted

    def _pull_alone(self, seq: _Sequence, tokens: Iterator[int]) -> None:
        for token in tokens:
            self._accept(seq, token)
            if seq.done:
                return
            if not self._inbox.empty() or seq.stream.cancelled:
                # Someone else arrived: continue this sequence inside the batch.
                self._waiting.appendleft(seq)
                return
        # The generator yields at most the remaining max_tokens, and the rules finish the
        # sequence at that count; end it anyway rather than leave a client waiting.
        self._finish(seq, "length")

    # -- embeddings ----------------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> Embeddings:
        vectors: list[list[float]] = []
        total = 0
        base = getattr(self.model, "base_model", self.model)
        for start in range(0, len(texts), 16):
            chunk = [self.tokenizer(t)["input_ids"][: self.context_length] or [self.pad_id]
                     for t in texts[start : start + 16]]
            total += sum(len(c) for c in chunk)
            width = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):
                ids[i, : len(row)] = torch.tensor(row)
                mask[i, : len(row)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
            vectors.extend(F.normalize(pooled, dim=-1).cpu().tolist())
        return Embeddings(vectors, total)


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, OptError) else f"{type(exc).__name__}: {exc}"


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(tensor, pad)
