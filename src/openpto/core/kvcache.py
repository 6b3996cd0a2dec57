"""A causal LM forward step over a KV cache, and cache roll-back, across transformers versions.

transformers 5 renamed the forward keyword ``past_key_values`` to ``cache`` and changed
``DynamicCache.crop`` to take a negative number of tokens to remove (older releases took the
length to keep and also accepted a negative count). These helpers hide both differences:

- ``new_cache(model)``: an empty ``DynamicCache`` for ``model``.
- ``forward_logits(model, input_ids, cache, attention_mask=None, position_ids=None, keep=1)``:
  logits ``[B, keep, V]`` of the last ``keep`` positions (float32), appending to ``cache``.
- ``crop_cache(cache, length)``: drop every cached position at or after ``length`` (roll back
  rejected speculative tokens).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.lru_cache(maxsize=32)
def _forward_keywords(model_type: Any) -> tuple[str, bool]:
    params = inspect.signature(model_type.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    return cache_kw, "logits_to_keep" in params


def new_cache(model: torch.nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)  # type: ignore[arg-type]
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length())


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions of every layer of ``cache``."""
    remove = cache_length(cache) - length
    if remove < 0:
        raise ValueError(f"cannot crop a cache of {cache_length(cache)} positions to {length}")
    if remove:
        # A negative argument means "remove this many" in every transformers release with crop.
        cache.crop(-remove)


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: Any,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    keep: int = 1,
) -> torch.Tensor:
    """Run ``input_ids`` [B, T] through ``model`` over ``cache``; logits of the last ``keep``."""
    model_type: Any = type(model)
    cache_kw, has_keep = _forward_keywords(model_type)
    kwargs: dict[str, Any] = {cache_kw: cache, "use_cache": True}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if has_keep:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, **kwargs).logits
    return logits[:, -keep:, :].float()
