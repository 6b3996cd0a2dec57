"""Sampling: turning a batch of next-token logits ``[B, V]`` into token ids.

Public types and functions (the server's batch decoder calls these once per step):

- ``SamplingParams``: a frozen, validated description of one request's sampling. ``temperature``
  0 means greedy (argmax); ``top_k`` 0, ``top_p`` 1, ``min_p`` 0 and ``repetition_penalty`` 1
  switch those filters off. ``max_tokens`` bounds the new tokens, ``stop`` lists stop strings
  (handled by the generator in ``core.generate``, not here), ``seed`` makes sampling reproducible.
- ``apply_repetition_penalty(logits, previous, penalty, mask=None)``: CTRL's penalty over the
  tokens already in each row.
- ``filter_logits(logits, params)``: temperature, then top-k, top-p and min-p; removed tokens get
  ``-inf``. Order follows vLLM and transformers: temperature first, min-p last.
- ``probabilities(logits, params)``: the distribution a sampler draws from (one-hot at the
  argmax for greedy); the speculative decoder compares these for target and draft.
- ``sample_next(logits, params, generator, previous=None)``: one token per row, ``LongTensor [B]``.
  ``params``/``generator`` may also be sequences with one entry per row (mixed requests in one
  batch).
- ``make_generator(params, device)``: a ``torch.Generator`` seeded from ``params.seed``.
- ``TokenConstraint``: what a per-request logit mask (a grammar) provides: ``mask_(logits)``
  before a row is sampled, ``accept(token_id)`` after. The decoders call both; which tokens are
  allowed is the constraint's business (``engines.grammar``).

Everything is pure torch on whatever device the logits live on; nothing here syncs the device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol

import torch

from openpto.errors import UsageError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request.

    The default is greedy decoding of up to 128 new tokens, so that a bare call is reproducible.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string would otherwise become one stop per char
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 is greedy), got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop),
             f"stop strings must be non-empty strings, got {self.stop!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes: object) -> SamplingParams:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["stop"] = list(self.stop)
        return data


class TokenConstraint(Protocol):
    """A per-request rule over next tokens (a grammar's matcher)."""

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the logits [1, V] of tokens not allowed next to ``-inf``, in place."""

    def accept(self, token_id: int) -> None:
        """Advance past the token that was sampled from the masked logits."""


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for ``sample_next``: seeded from ``params.seed``, or from fresh entropy."""
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def apply_repetition_penalty(
    logits: torch.Tensor,
    previous: torch.Tensor,
    penalty: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers and vLLM apply it.

    For each token already present in a row of ``previous`` [B, T], a positive logit is divided
    by ``penalty`` and a negative one multiplied by it. ``mask`` [B, T] (1 = real token) leaves
    padding out. Returns a new tensor.
    """
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    ones = torch.ones_like(previous, dtype=logits.dtype)
    weights = ones if mask is None else mask.to(logits.dtype)
    # scatter_add counts occurrences deterministically even when a row repeats a token.
    counts = torch.zeros_like(logits).scatter_add_(1, previous.to(logits.device), weights)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalised, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on a batch of logits [B, V]; removed tokens get -inf.

    top-k keeps exactly k tokens per row (ties at the k-th value are broken by index);
    top-p keeps the smallest set of most likely tokens whose probability mass reaches top_p;
    min-p removes tokens less likely than ``min_p`` times the row's most likely token.
    Greedy params (temperature 0) skip the temperature step; argmax is unaffected by it.
    """
    out = logits.float()
    if params.temperature > 0:
        out = out / params.temperature
    vocab = out.shape[-1]
    if 0 < params.top_k < vocab:
        top = torch.topk(out, params.top_k, dim=-1)
        out = torch.full_like(out, -math.inf).scatter_(-1, top.indices, top.values)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        # A token is kept if the mass of the tokens ranked above it is still below top_p; the
        # most likely token always survives.
        remove_sorted = mass_before >= params.top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
        out = out.masked_fill(remove, -math.inf)
    if params.min_p > 0.0:
        probs = torch.softmax(out, dim=-1)
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values
        out = out.masked_fill(probs < threshold, -math.inf)
    return out


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution [B, V] that ``sample_next`` draws from (one-hot at the argmax if greedy)."""
    if params.greedy:
        index = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, index, 1.0)
    return torch.softmax(filter_logits(logits, params), dim=-1)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    previous: torch.Tensor | None = None,
    previous_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one next token per row of ``logits`` [B, V]; returns ``LongTensor [B]``.

    ``previous`` [B, T] (and ``previous_mask``) are the tokens the repetition penalty looks at:
    prompt and generated so far. With one ``SamplingParams`` the whole batch is processed at
    once; with one per row, each row is processed with its own params and generator.
    """
    if logits.dim() != 2:
        raise UsageError(f"sample_next expects logits of shape [B, V], got {tuple(logits.shape)}")
    if isinstance(params, SamplingParams):
        if generator is not None and not isinstance(generator, torch.Generator):
            raise UsageError("one SamplingParams for the batch needs one generator (or None)")
        return _sample_rows(logits, params, generator, previous, previous_mask)
    if len(params) != logits.shape[0]:
        raise UsageError(f"{len(params)} SamplingParams for a batch of {logits.shape[0]} rows")
    gens: Sequence[torch.Generator | None]
    if generator is None or isinstance(generator, torch.Generator):
        gens = [generator] * len(params)
    else:
        gens = generator
    rows = []
    for i, row_params in enumerate(params):
        prev = None if previous is None else previous[i : i + 1]
        mask = None if previous_mask is None else previous_mask[i : i + 1]
        rows.append(_sample_rows(logits[i : i + 1], row_params, gens[i], prev, mask))
    return torch.cat(rows)


def _sample_rows(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    previous: torch.Tensor | None,
    previous_mask: torch.Tensor | None,
) -> torch.Tensor:
    if previous is not None:
        penalty = params.repetition_penalty
        logits = apply_repetition_penalty(logits, previous, penalty, previous_mask)
    if params.greedy:
        return logits.argmax(dim=-1)
    # The same distribution the speculative verifier compares against, by construction.
    probs = probabilities(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
