"""Speculative decoding: a draft proposes gamma tokens, the target checks them in one forward pass.

The output is exactly what the target alone would produce: with greedy params the same tokens
(a proposal is kept only if it is the target's argmax), with sampling the same distribution
(Leviathan et al. 2023; Chen et al. 2023): proposal ``d ~ q`` is accepted with probability
``min(1, p(d) / q(d))``; at the first rejection the token is drawn from the residual
``max(0, p - q)`` renormalised, and if all proposals pass, one bonus token is drawn from the
target's next distribution. ``p`` and ``q`` are the *filtered* distributions (temperature, top-k,
top-p, min-p), so the output follows the target's filtered distribution; the repetition penalty is
applied to the target's logits only (q may be anything, the correction stays exact).

Public interface:

- ``speculative_steps(target, draft, prompt_ids, params, gamma=4, ...)``: the token-step
  generator (several ids per verification step), a drop-in for ``core.generate.token_steps``.
  ``stats`` (a ``SpeculativeStats``) is filled as it runs.
- ``speculative_stream(target, tokenizer, draft, prompt, params, ...)``: those ids through the
  same ``core.steps.RequestRules`` as ``core.generate.generate_stream``: the same
  ``StepRecord``s, stop strings, end-of-sequence and length rules.
- ``speculative_generate(...) -> SpeculativeResult``: the stream collected plus its statistics.
- ``verify(p, proposals, q, greedy, generator) -> (accepted, next_token)``: the acceptance rule
  on one step, a pure function (tested statistically).
- ``SpeculativeStats``: vLLM's metric names: ``draft_acceptance_rate`` (accepted / drafted),
  ``mean_acceptance_length`` (1 + accepted / steps: tokens per target forward) and
  ``acceptance_per_position`` (acceptance rate of the i-th proposal of a step).

Caches: the target's KV cache always holds every committed token but the last; after a
verification step it is cropped to drop rejected proposals, and the draft rolls back its own.
Adaptive gamma picks, before each step, the gamma that maximises expected tokens per unit of
time, ``(1 - a^(g+1)) / ((1 - a) (g c + 1 + g v))``, from the running acceptance rate ``a``, the
measured cost ``c`` of one draft token and the measured extra cost ``v`` of each additional token
in the target's verification pass, both relative to a one-token target pass (Leviathan et al.,
section 3.4, with the verification cost fitted instead of assumed constant). Because it follows
measured timings, a seeded sampling run is reproducible token for token only with
``adaptive=False``; the output law is exact either way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from openpto.core.drafts import Draft
from openpto.core.generate import (
    GenerationResult,
    Prompt,
    collect,
    encode_prompt,
    eos_ids,
    model_device,
)
from openpto.core.kvcache import crop_cache, forward_logits, new_cache
from openpto.core.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_generator,
    probabilities,
    sample_next,
)
from openpto.core.steps import RequestRules, StepRecord, stream_records
from openpto.errors import UsageError


@dataclasses.dataclass
class SpeculativeStats:
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    rejected_steps: int = 0
    drafted_at: list[int] = dataclasses.field(default_factory=list)
    accepted_at: list[int] = dataclasses.field(default_factory=list)
    gammas: list[int] = dataclasses.field(default_factory=list)
    draft_seconds: float = 0.0
    draft_prefill_seconds: float = 0.0
    target_seconds: float = 0.0
    # (tokens verified, seconds) of each target pass, for the verification cost model.
    verify_times: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def verify_cost(self) -> tuple[float, float]:
        """Least-squares fit ``seconds = fixed + per_token * tokens`` of the target passes: on a
        CPU a pass over 9 tokens costs visibly more than over 1, on a GPU almost the same."""
        points = self.verify_times[-64:]
        n = len(points)
        mean_x = sum(x for x, _ in points) / n
        mean_y = sum(y for _, y in points) / n
        var = sum((x - mean_x) ** 2 for x, _ in points)
        slope = 0.0 if var == 0 else sum((x - mean_x) * (y - mean_y) for x, y in points) / var
        slope = max(slope, 0.0)
        return max(mean_y - slope * mean_x, 1e-9), slope

    def add(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.rejected_steps += int(accepted < drafted)
        while len(self.drafted_at) < drafted:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(drafted):
            self.drafted_at[i] += 1
            self.accepted_at[i] += int(i < accepted)

    @property
    def draft_acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_token_acceptance(self) -> float:
        """Maximum-likelihood chance that one proposal passes, given the ones before it did:
        proposals after the first rejection were never tested, so accepted / drafted would be
        biased low."""
        tested = self.accepted + self.rejected_steps
        return self.accepted / tested if tested else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.accepted / self.steps if self.steps else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "draft_acceptance_rate": self.draft_acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
            "acceptance_per_position": self.acceptance_per_position,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "verification_steps": self.steps,
            "draft_seconds": self.draft_seconds,
            "draft_prefill_seconds": self.draft_prefill_seconds,
            "target_seconds": self.target_seconds,
        }


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    generation: GenerationResult
    stats: SpeculativeStats


def verify(
    p: torch.Tensor,
    proposals: list[int],
    q: torch.Tensor | None,
    greedy: bool,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Check ``proposals`` against the target's distributions ``p`` [n + 1, V].

    Returns how many proposals are accepted and the token that follows them (the target's
    correction at the first rejection, or its bonus token when all pass). ``q`` [n, V] are the
    draft's distributions, ``None`` for a deterministic draft (a one-hot q).
    """
    for i, token in enumerate(proposals):
        if greedy:
            best = int(p[i].argmax())
            if best != token:
                return i, best
            continue
        q_token = 1.0 if q is None else float(q[i, token])
        p_token = float(p[i, token])
        # Accept with probability min(1, p/q): draw u in [0, 1) and keep if u * q < p.
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * q_token < p_token:
            continue
        if q is None:
            residual = p[i].clone()
            residual[token] = 0.0
        else:
            residual = (p[i] - q[i]).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: a rejection had probability 0
            residual = p[i]
        fixed = torch.multinomial(residual / residual.sum(), 1, generator=generator)
        return i, int(fixed.item())
    n = len(proposals)
    if greedy:
        return n, int(p[n].argmax())
    return n, int(torch.multinomial(p[n], 1, generator=generator).item())


def best_gamma(rate: float, cost: float, max_gamma: int, verify_per_token: float = 0.0) -> int:
    """The gamma maximising expected tokens per unit time (Leviathan et al., eq. 1 and 3.4).

    Times are in units of one target pass over a single token: ``cost`` is one draft token,
    ``verify_per_token`` what each extra verified token adds to the target pass.
    """
    rate = min(max(rate, 0.0), 0.999)
    best, best_value = 1, -1.0
    for g in range(1, max_gamma + 1):
        step = g * cost + 1.0 + g * verify_per_token
        value = (1.0 - rate ** (g + 1)) / ((1.0 - rate) * step)
        if value > best_value:
            best, best_value = g, value
    return best


def _target_probs(
    logits: torch.Tensor, tokens: list[int], proposals: list[int], params: SamplingParams
) -> torch.Tensor:
    """Rows of ``p``; row i's repetition penalty sees the tokens committed plus proposals[:i]."""
    if params.repetition_penalty != 1.0:
        rows = []
        for i in range(logits.shape[0]):
            seen = torch.tensor([tokens + proposals[:i]], device=logits.device)
            penalty = params.repetition_penalty
            rows.append(apply_repetition_penalty(logits[i : i + 1], seen, penalty))
        logits = torch.cat(rows)
    return probabilities(logits, params)


@torch.inference_mode()
def speculative_steps(
    target: torch.nn.Module,
    draft: Draft,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    gamma: int = 4,
    adaptive: bool = True,
    max_gamma: int | None = None,
    stats: SpeculativeStats | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Token ids with ``draft`` proposing and ``target`` verifying (see the module docstring),
    at most ``params.max_tokens``; the consumer stops pulling when its rules finish."""
    if gamma < 1:
        raise UsageError(f"gamma must be >= 1 (draft tokens per step), got {gamma}")
    max_gamma = max_gamma or 2 * gamma
    if max_gamma < gamma:
        raise UsageError(f"max_gamma ({max_gamma}) must be >= gamma ({gamma})")
    stats = stats if stats is not None else SpeculativeStats()
    device = model_device(target)
    tokens = list(prompt_ids)
    if generator is None and not params.greedy:
        generator = make_generator(params, device)
    draft.reset()
    cache = new_cache(target)
    penalise = params.repetition_penalty != 1.0

    # The first token comes from a plain prefill; from then on the cache holds tokens[:-1].
    history = torch.tensor([tokens], dtype=torch.long, device=device)
    logits = forward_logits(target, history, cache)[:, -1]
    vocab = logits.shape[-1]
    first = int(sample_next(logits, params, generator, history if penalise else None).item())
    tokens.append(first)
    yield first
    produced = 1
    if produced < params.max_tokens:
        started = time.perf_counter()
        draft.prefill(tokens)
        stats.draft_prefill_seconds += time.perf_counter() - started
    current = gamma
    while produced < params.max_tokens:
        remaining = params.max_tokens - produced
        step_gamma = max(1, min(current, remaining - 1)) if remaining > 1 else 0
        started = time.perf_counter()
        proposals: list[int] = []
        q: torch.Tensor | None = None
        if step_gamma:
            proposals, q = draft.propose(tokens, step_gamma, params, generator, vocab)
        drafted_at = time.perf_counter()
        verify_ids = torch.tensor([tokens[-1:] + proposals], dtype=torch.long, device=device)
        logits = forward_logits(target, verify_ids, cache, keep=len(proposals) + 1)[0]
        p = _target_probs(logits, tokens, proposals, params)
        accepted, following = verify(p, proposals, q, params.greedy, generator)
        verified_at = time.perf_counter()
        stats.draft_seconds += drafted_at - started
        stats.target_seconds += verified_at - drafted_at
        stats.verify_times.append((len(proposals) + 1, verified_at - drafted_at))
        # Rejected proposals leave both caches: the target keeps every committed token but the new
        # last one; the draft keeps what it saw up to the last accepted proposal.
        crop_cache(cache, len(tokens) + accepted)
        draft.rollback(len(tokens) + accepted)
        if proposals:
            stats.add(len(proposals), accepted)
            stats.gammas.append(len(proposals))
        for token_id in [*proposals[:accepted], following]:
            tokens.append(token_id)
            yield token_id
            produced += 1
            if produced >= params.max_tokens:
                return
        if adaptive and stats.steps:
            fixed, per_verified = stats.verify_cost()
            single = fixed + per_verified  # one target pass over one token
            per_draft = stats.draft_seconds / max(stats.drafted, 1)
            current = best_gamma(stats.per_token_acceptance, per_draft / single, max_gamma,
                                 per_verified / single)


def speculative_stream(
    target: torch.nn.Module,
    tokenizer: Any,
    draft: Draft,
    prompt: Prompt,
    params: SamplingParams | None = None,
    *,
    gamma: int = 4,
    adaptive: bool = True,
    max_gamma: int | None = None,
    stats: SpeculativeStats | None = None,
    eos_token_ids: Iterable[int] | None = None,
    ignore_eos: bool = False,
    generator: torch.Generator | None = None,
    skip_special_tokens: bool = True,
) -> Iterator[StepRecord]:
    """``speculative_steps`` through the request rules of ``core.steps`` (``StepRecord``s)."""
    if gamma < 1:
        raise UsageError(f"gamma must be >= 1 (draft tokens per step), got {gamma}")
    params = params or SamplingParams()
    ids = encode_prompt(tokenizer, prompt)
    eos = set() if ignore_eos else set(eos_token_ids or eos_ids(target, tokenizer))
    rules = RequestRules(tokenizer, ids, params, eos, skip_special_tokens=skip_special_tokens)
    steps = speculative_steps(target, draft, ids, params, gamma=gamma, adaptive=adaptive,
                              max_gamma=max_gamma, stats=stats, generator=generator)
    return stream_records(steps, rules)


def speculative_generate(
    target: torch.nn.Module,
    tokenizer: Any,
    draft: Draft,
    prompt: Prompt,
    params: SamplingParams | None = None,
    **kwargs: Any,
) -> SpeculativeResult:
    stats = SpeculativeStats()
    records = speculative_stream(target, tokenizer, draft, prompt, params, stats=stats, **kwargs)
    return SpeculativeResult(collect(records), stats)
