"""The torch backend: any model or artifact ``load_model`` reads, served with continuous batching.

Artifacts come with their packed kernels (``load_model`` installs them), so a quantized artifact
is served on the same int4/int8 modules that ``opt profile`` measures.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch

from openpto.core.generate import build_chat_prompt, eos_ids
from openpto.core.sampling import SamplingParams, TokenConstraint
from openpto.core.static_decode import DECODE_MODES, DecodeMode
from openpto.engines.batching import BatchScheduler
from openpto.engines.engine import (
    Embeddings,
    Engine,
    EngineOptions,
    EngineStats,
    ModelInfo,
    served_name,
)
from openpto.engines.streams import RequestStream
from openpto.errors import BackendUnavailable, UsageError


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model: str | None = None, options: EngineOptions | None = None) -> None:
        self.spec = model
        self.options = options or EngineOptions()
        self._model: torch.nn.Module | None = None
        self._tokenizer: Any = None
        self._info: ModelInfo | None = None
        self._scheduler: BatchScheduler | None = None
        self._grammars: Any = None

    supports_constraints = True

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, tokenizer: Any, name: str,
        options: EngineOptions | None = None, path: str = "",
    ) -> TorchEngine:
        """An engine over a model already in memory (tests, notebooks, benchmarks)."""
        engine = cls(None, options)
        engine._adopt(model, tokenizer, name, path, kind="in-memory")
        return engine

    def load(self) -> None:
        if self._scheduler is not None:
            return
        if self._model is None:
            from openpto.models import load_model

            loaded = load_model(self.spec, dtype=self.options.dtype, device=self.options.device)
            self._adopt(loaded.model, loaded.tokenizer, served_name(loaded.name), str(loaded.path),
                        kind=loaded.kind, digest=loaded.source_sha256 or "",
                        metadata=loaded.metadata)
        assert self._model is not None
        speculative = _speculative_factory(self.options, self._model, self._tokenizer,
                                           self.info.id, self.info.path)
        self._scheduler = BatchScheduler(
            self._model,
            self._tokenizer,
            eos=eos_ids(self._model, self._tokenizer),
            max_batch=self.options.max_batch,
            context_length=self.info.context_length,
            speculative=speculative,
            threads=self.options.threads,
            decode=_decode_mode(self.options.decode),
        )

    def _adopt(self, model: torch.nn.Module, tokenizer: Any, name: str, path: str, *, kind: str,
               digest: str = "", metadata: dict[str, Any] | None = None) -> None:
        model.eval()
        self._model, self._tokenizer = model, tokenizer
        config = getattr(model, "config", None)
        params = sum(p.numel() for p in model.parameters())
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        dtype = next(model.parameters()).dtype
        q = (metadata or {}).get("quantization") or {}
        quant = (f"{q['method']}-w{q.get('bits')}-g{q.get('group_size')}" if q.get("method")
                 else str(dtype).removeprefix("torch.").upper())
        context = self.options.context_length or int(
            getattr(config, "max_position_embeddings", 2048) or 2048)
        self._info = ModelInfo(
            id=name,
            backend=self.backend,
            path=path,
            family=str(getattr(config, "model_type", "unknown")),
            format="artifact" if kind == "artifact" else "safetensors",
            parameter_count=params,
            quantization=quant[:40],
            context_length=context,
            embedding_length=int(getattr(config, "hidden_size", 0) or 0),
            vocab_size=int(getattr(config, "vocab_size", 0) or 0),
            size_bytes=size,
            digest=digest or hashlib.sha256(f"{name}:{path}:{params}".encode()).hexdigest(),
            chat_template=str(getattr(tokenizer, "chat_template", "") or ""),
        )

    @property
    def ready(self) -> bool:
        return self._scheduler is not None

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            return ModelInfo(id=served_name(self.spec), backend=self.backend)
        return self._info

    def tokenize(self, text: str) -> list[int]:
        bos = getattr(self._tokenizer, "bos_token", None)
        # A chat template already wrote the BOS token; adding it again would double it.
        add_special = not (bos and text.startswith(bos))
        return [int(t) for t in self._tokenizer(text, add_special_tokens=add_special)["input_ids"]]

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        return build_chat_prompt(self._tokenizer, messages)

    def chat_prompt_with_tools(self, messages: Sequence[dict[str, Any]],
                               tools: Sequence[Any] = ()) -> str:
        from openpto.engines.tool_calls import chat_prompt

        return chat_prompt(self._tokenizer, messages, tools)

    def constraint(self, grammar: str) -> TokenConstraint:
        from openpto.engines.grammar import GrammarCompiler

        if self._grammars is None:
            self._grammars = GrammarCompiler(self._tokenizer, self.info.vocab_size or None)
        return self._grammars.constraint(grammar)  # type: ignore[no-any-return]

    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: RequestStream,
               constraint: TokenConstraint | None = None) -> None:
        self._require().submit(prompt_ids, params, stream, constraint)

    def embed(self, texts: Sequence[str]) -> concurrent.futures.Future[Embeddings]:
        return self._require().embed(texts)

    def stats(self) -> EngineStats:
        return self._scheduler.stats() if self._scheduler is not None else EngineStats()

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None

    def _require(self) -> BatchScheduler:
        if self._scheduler is None:
            raise BackendUnavailable("the model is still loading")
        return self._scheduler


def _decode_mode(mode: str) -> DecodeMode:
    if mode not in DECODE_MODES:
        raise UsageError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    return cast(DecodeMode, mode)


# -- drafts for --draft ----------------------------------------------------------------------------


def _speculative_factory(options: EngineOptions, target: torch.nn.Module, tokenizer: Any,
                         name: str, path: str) -> Any:
    """Starts ``core.speculative`` runs with the draft ``options.draft`` names: lookup[:N],
    self:layers=K, self:int4, self:int8 or a MODEL, resolved by ``options.resolve_draft``."""
    spec = options.draft
    if not spec:
        return None
    if options.resolve_draft is None:
        raise UsageError(f"draft {spec!r} given without EngineOptions.resolve_draft "
                         "(pass openpto.pipeline.generate.resolve_draft)")
    from pathlib import Path

    from openpto.core.speculative import SpeculativeStats, speculative_steps
    from openpto.models import LoadedModel

    loaded = LoadedModel(target, tokenizer, name, "in-memory", Path(path))  # type: ignore[arg-type]
    dtype = str(next(target.parameters()).dtype).removeprefix("torch.")
    draft, _ = options.resolve_draft(spec, loaded, dtype=dtype)

    def start(context: list[int], params: SamplingParams,
              generator: torch.Generator | None) -> tuple[Iterator[int], Any]:
        stats = SpeculativeStats()
        tokens = speculative_steps(target, draft, context, params, stats=stats,
                                   generator=generator)
        return tokens, stats

    return start
