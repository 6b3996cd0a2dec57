"""Drafts for speculative decoding: cheap proposers of the next few tokens.

A ``Draft`` sees the committed token ids and proposes up to ``gamma`` more, with the
distribution ``q`` it drew each one from (``None`` for a deterministic proposer, which the verifier
treats as a one-hot ``q``). After the target has verified, ``rollback(valid)`` tells the draft that
only the first ``valid`` committed tokens match what it has seen, so it drops the rest of its KV
cache.

- ``ModelDraft(model)``: any causal LM over the same vocabulary: another checkpoint, the target
  compressed by this toolkit (``self:int4``/``self:int8``, built in the pipeline) or
  ``early_exit_model(target, k)`` (``self:layers=K``).
- ``LookupDraft(max_ngram, min_ngram)``: prompt lookup decoding (Saxena 2023): the continuation of
  the latest earlier occurrence of the sequence's last n-gram.
- ``check_same_tokenizer(a, b)``: raises ``UsageError`` unless both tokenizers map the same
  strings to the same ids; a draft over another vocabulary cannot be verified token by token.
"""

from __future__ import annotations

import abc
import copy
from typing import Any

import torch

from openpto.architectures import architecture_of
from openpto.core.kvcache import cache_length, crop_cache, forward_logits, new_cache
from openpto.core.sampling import SamplingParams, probabilities
from openpto.errors import UnsupportedModel, UsageError


class Draft(abc.ABC):
    name: str = "draft"

    @abc.abstractmethod
    def propose(
        self,
        tokens: list[int],
        gamma: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        vocab_size: int,
    ) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``gamma`` proposed ids after ``tokens`` and their draft probabilities [n, V]."""

    @abc.abstractmethod
    def rollback(self, valid: int) -> None:
        """Only ``tokens[:valid]`` of the next call's ``tokens`` match what was proposed."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every request state (a new prompt follows)."""

    def prefill(self, tokens: list[int]) -> None:
        """Optionally read the prompt ahead of the first proposal (a model draft fills its KV
        cache), so that per-proposal costs measured later are decode costs only."""
        return None


class ModelDraft(Draft):
    """A causal LM proposing by sampling (or argmax) from its own next-token distribution."""

    def __init__(self, model: torch.nn.Module, name: str = "model") -> None:
        self.model = model
        self.name = name
        self.device = next(model.parameters()).device
        self.cache: Any = None

    def reset(self) -> None:
        self.cache = None

    def prefill(self, tokens: list[int]) -> None:
        self.cache = new_cache(self.model)
        if len(tokens) > 1:
            with torch.inference_mode():
                ids = torch.tensor([tokens[:-1]], dtype=torch.long, device=self.device)
                forward_logits(self.model, ids, self.cache)

    def propose(
        self,
        tokens: list[int],
        gamma: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        vocab_size: int,
    ) -> tuple[list[int], torch.Tensor | None]:
        if self.cache is None:
            self.cache = new_cache(self.model)
        seen = cache_length(self.cache)
        if seen >= len(tokens):  # never happens after a correct rollback; recover anyway
            crop_cache(self.cache, len(tokens) - 1)
            seen = len(tokens) - 1
        feed = torch.tensor([tokens[seen:]], dtype=torch.long, device=self.device)
        proposals: list[int] = []
        rows: list[torch.Tensor] = []
        with torch.inference_mode():
            for step in range(gamma):
                logits = _fit_vocab(forward_logits(self.model, feed, self.cache)[:, -1], vocab_size)
                q = probabilities(logits, params)
                if params.greedy:
                    token = q.argmax(dim=-1)
                else:
                    token = torch.multinomial(q, 1, generator=generator).view(-1)
                proposals.append(int(token.item()))
                rows.append(q[0])
                if step + 1 < gamma:
                    feed = token.view(1, 1)
        return proposals, torch.stack(rows)

    def rollback(self, valid: int) -> None:
        if self.cache is not None and cache_length(self.cache) > valid:
            crop_cache(self.cache, valid)


def _fit_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft and target heads may be padded differently; pad with -inf or cut to the target's."""
    width = logits.shape[-1]
    if width == vocab_size:
        return logits
    if width > vocab_size:
        return logits[..., :vocab_size]
    pad = torch.full((*logits.shape[:-1], vocab_size - width), -torch.inf, device=logits.device)
    return torch.cat([logits, pad], dim=-1)


class LookupDraft(Draft):
    """Prompt lookup: propose what followed the latest earlier match of the last n-gram."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise UsageError(
                f"lookup n-gram sizes need 1 <= min <= max, got {min_ngram}, {max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(
        self,
        tokens: list[int],
        gamma: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        vocab_size: int,
    ) -> tuple[list[int], torch.Tensor | None]:
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            # Latest match first: recent text predicts the continuation best.
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + gamma]
                    if follow:
                        return follow, None
        return [], None

    def rollback(self, valid: int) -> None:
        return None  # stateless: every proposal is recomputed from the committed tokens

    def reset(self) -> None:
        return None


def early_exit_model(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A view of ``model`` that runs only its first ``layers`` decoder layers, then the final norm
    and the shared head; it shares every weight with ``model`` (no copy). Where the layers and
    the final norm live comes from the model's architecture adapter."""
    arch = architecture_of(model)
    path, decoder = arch.decoder_layers(model)
    parent_path, _, attr = path.rpartition(".")
    norm_parent, _, norm_attr = arch.final_norm.rpartition(".")
    if parent_path != norm_parent or not hasattr(model.get_submodule(parent_path), norm_attr):
        raise UnsupportedModel(
            f"self:layers=K needs the final norm beside the decoder layers; "
            f"{type(model).__name__} has {path} and {arch.final_norm}"
        )
    total = len(decoder)
    if not 1 <= layers < total:
        raise UsageError(f"self:layers=K needs 1 <= K < {total} (the model's layers), got {layers}")
    config: Any = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    for key in ("layer_types",):  # per-layer lists must match the shorter depth
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, getattr(config, key)[:layers])
    # Shallow copies with their own child dicts, from the model down to the layers' parent:
    # swapping the layer list there leaves the target intact.
    view = _shallow_view(model, config)
    inner = view
    for part in parent_path.split(".") if parent_path else []:
        child = _shallow_view(inner.get_submodule(part), config)
        setattr(inner, part, child)
        inner = child
    setattr(inner, attr, torch.nn.ModuleList(list(decoder)[:layers]))
    return view


def _shallow_view(module: torch.nn.Module, config: Any) -> torch.nn.Module:
    view = copy.copy(module)
    view._modules = dict(module._modules)
    if hasattr(module, "config"):
        view.config = config
    return view


def check_same_tokenizer(target: Any, draft: Any) -> None:
    if target is None or draft is None or target is draft:
        return
    target_vocab = target.get_vocab()
    draft_vocab = draft.get_vocab()
    if target_vocab != draft_vocab:
        differ = len(set(target_vocab.items()) ^ set(draft_vocab.items()))
        raise UsageError(
            f"the draft's tokenizer differs from the target's ({len(draft_vocab)} vs "
            f"{len(target_vocab)} tokens, {differ} entries differ); "
            "a draft must share the target's vocabulary"
        )
