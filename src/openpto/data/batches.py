"""Text -> token ids -> calibration batches, deterministically from a seed."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from openpto.data.corpora import CALIBRATION_DEFAULT
from openpto.data.sources import TextSource, load_text
from openpto.errors import DataError, UsageError


class OverlapWarning(UserWarning):
    """Calibration windows overlap because the text is too short for distinct ones."""


def tokenize_text(tokenizer: Any, text: str | TextSource) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of ids, without BOS/EOS or any special token."""
    if isinstance(text, TextSource):
        text = text.text
    # verbose=False: the text is meant to be longer than the model's context; windows come later.
    encoded = tokenizer(
        text, add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    return torch.tensor(encoded, dtype=torch.long)


@dataclass(frozen=True)
class WindowSample:
    """Start offsets of sampled windows; ``overlapping`` says whether windows may share tokens."""

    starts: tuple[int, ...]
    overlapping: bool


def sample_windows(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> WindowSample:
    """Choose ``n_samples`` windows of ``seq_len`` tokens out of ``n_tokens``, from ``seed``.

    When the text holds at least ``n_samples`` whole windows, the windows are distinct and never
    overlap: a random offset, then a random choice of the non-overlapping slots after it. When it
    does not, start offsets are drawn uniformly and windows overlap (``overlapping`` is True).
    """
    if seq_len < 1:
        raise UsageError(f"the calibration sequence length must be at least 1, not {seq_len}")
    if n_samples < 1:
        raise UsageError(f"the number of calibration samples must be at least 1, not {n_samples}")
    if n_tokens < seq_len:
        raise DataError(
            f"the text has {n_tokens} tokens, fewer than one window of {seq_len}"
        )
    rng = random.Random(seed)  # nosec B311  # seeded sampling of calibration text, not security
    slots = n_tokens // seq_len
    if slots >= n_samples:
        offset = rng.randint(0, n_tokens - slots * seq_len)
        chosen = sorted(rng.sample(range(slots), n_samples))
        return WindowSample(tuple(offset + s * seq_len for s in chosen), overlapping=False)
    starts = sorted(rng.randint(0, n_tokens - seq_len) for _ in range(n_samples))
    return WindowSample(tuple(starts), overlapping=True)


def calibration_batches(
    tokenizer: Any,
    source: str | TextSource | None,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    *,
    text_field: str = "text",
    log: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens from ``source`` as a LongTensor ``[n, L]``.

    ``source`` is anything ``load_text`` accepts (``None`` means ``pydoc-topics``). When the text
    is too short for distinct windows they overlap, and ``log`` (or a warning) says so.
    """
    text = load_text(source, default=CALIBRATION_DEFAULT, text_field=text_field)
    ids = tokenize_text(tokenizer, text)
    sample = sample_windows(len(ids), n_samples, seq_len, seed)
    if sample.overlapping:
        message = (
            f"{text.name} has {len(ids)} tokens, too few for {n_samples} distinct windows of "
            f"{seq_len}: the {n_samples} calibration windows overlap"
        )
        if log is not None:
            log(message)
        else:
            warnings.warn(message, OverlapWarning, stacklevel=2)
    return torch.stack([ids[s : s + seq_len] for s in sample.starts])
