"""Perplexity over non-overlapping windows: the quality number every method is judged by.

The protocol (docs/evaluation.md): the token ids of the whole text (no special tokens), cut to
the first ``max_tokens``, split into non-overlapping windows of ``seq_len``; an incomplete tail
window is dropped. Inside each window every token after the first is scored against the model's
prediction from the tokens before it, so each window scores ``seq_len - 1`` tokens and no token
is scored twice. Perplexity is ``exp`` of the mean negative log-likelihood over all scored tokens,
accumulated in float64 from float32 log-probabilities whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from openpto.errors import DataError, UsageError


@dataclass(frozen=True)
class WindowPlan:
    """How a token stream is cut: ``windows`` windows of ``seq_len`` from offset 0."""

    seq_len: int
    windows: int
    available_tokens: int  # tokens in the text, before max_tokens
    dropped_tokens: int  # tokens within max_tokens left out by the incomplete tail window

    @property
    def tokens(self) -> int:
        """Tokens fed to the model."""
        return self.windows * self.seq_len

    @property
    def scored_tokens(self) -> int:
        """Tokens whose likelihood counts: all but the first of each window."""
        return self.windows * (self.seq_len - 1)

    def spans(self) -> list[tuple[int, int]]:
        return [(i * self.seq_len, (i + 1) * self.seq_len) for i in range(self.windows)]


def plan_windows(n_tokens: int, seq_len: int, max_tokens: int | None = None) -> WindowPlan:
    """Cut ``n_tokens`` (at most ``max_tokens`` of them) into whole windows of ``seq_len``."""
    if seq_len < 2:
        raise UsageError(
            f"--seq-len must be at least 2 (a window scores seq_len - 1 tokens), not {seq_len}"
        )
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be positive, not {max_tokens}")
    if n_tokens == 0:
        raise DataError("the text is empty: nothing to score")
    used = n_tokens if max_tokens is None else min(n_tokens, max_tokens)
    windows = used // seq_len
    if windows == 0:
        raise DataError(
            f"{used} tokens are fewer than one window of {seq_len}: "
            "give more text (or --max-tokens) or a shorter --seq-len"
        )
    return WindowPlan(seq_len, windows, n_tokens, used - windows * seq_len)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per scored token
    plan: WindowPlan

    @property
    def tokens(self) -> int:
        return self.plan.tokens

    @property
    def scored_tokens(self) -> int:
        return self.plan.scored_tokens


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    seq_len: int,
    *,
    max_tokens: int | None = None,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on a 1-D tensor of token ids (see the module docstring).

    ``model(ids).logits`` must be ``[batch, seq, vocab]``; the windows go to the device of the
    model's first parameter, ``batch_size`` at a time; ``progress(n)`` is called after each batch
    with the number of windows it held.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    ids = input_ids.reshape(-1)
    plan = plan_windows(ids.numel(), seq_len, max_tokens)
    windows = ids[: plan.tokens].view(plan.windows, seq_len)
    device = _device_of(model)
    total_nll = 0.0
    for first in range(0, plan.windows, batch_size):
        batch = windows[first : first + batch_size].to(device)
        logits = _logits(model, batch)
        # float32 for the log-softmax: bf16/fp16 logits would lose digits of the likelihood.
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch[:, 1:].reshape(-1),
            reduction="sum",
        )
        total_nll += float(nll.double().item())
        if progress is not None:
            progress(batch.shape[0])
    mean_nll = total_nll / plan.scored_tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, plan)


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    # No KV cache: each window is scored in one forward pass and never continued.
    output = model(batch, use_cache=False)
    return output.logits if hasattr(output, "logits") else output


def _device_of(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
