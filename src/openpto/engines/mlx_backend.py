"""The MLX backend (``mlx-lm``): Apple Silicon, or MLX's CPU build on Linux.

MODEL may be an MLX folder (``opt export --format mlx``), a Hugging Face folder, or anything
``load_model`` converts from GGUF (the default alias): the cached float safetensors folder of that
conversion is what mlx-lm reads. Requests run one at a time on one worker thread; sampling is
mlx-lm's own (its sampler and repetition-penalty processor take the same parameters). A grammar
(``engines.grammar``) masks the logits through mlx-lm's ``logits_processors`` hook.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from openpto.core.sampling import SamplingParams, TokenConstraint
from openpto.engines.engine import (
    Embeddings,
    ModelInfo,
    SerialEngine,
    served_name,
)
from openpto.errors import BackendUnavailable, require


def mlx_folder(spec: str | None) -> tuple[Path, str]:
    """The folder mlx-lm should read for MODEL, and the model's name."""
    from openpto.models import hf_folder, resolve_model

    source = resolve_model(spec)
    folder = hf_folder(source)  # a GGUF source's cached float conversion, made if needed
    if source.kind == "alias":
        return folder, source.name
    if source.kind == "gguf":
        return folder, source.path.stem
    return folder, served_name(source.name)


def _rope_overrides(folder: Path) -> dict[str, Any]:
    """transformers 5 writes RoPE settings under ``rope_parameters``; mlx-lm reads the older
    top-level ``rope_theta``/``rope_scaling`` and would silently fall back to theta 10000."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    rope = config.get("rope_parameters")
    if "rope_theta" in config or not isinstance(rope, dict) or "rope_theta" not in rope:
        return {}
    overrides: dict[str, Any] = {"rope_theta": float(rope["rope_theta"])}
    if rope.get("rope_type", "default") != "default":
        overrides["rope_scaling"] = rope
    return overrides


class MLXEngine(SerialEngine):
    backend = "mlx"
    library = ("mlx_lm", "mlx", "the MLX backend")
    # Set by load().
    _model: Any = None
    _hf_tokenizer: Any = None
    _grammars: Any = None
    supports_constraints = True

    def load(self) -> None:
        if self._model is not None:
            return
        require(*self.library)
        folder, name = mlx_folder(self.spec)
        # MLX keeps per-thread default streams: load on the thread that will generate.
        self._start_worker()
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def load_here() -> None:
            try:
                self._load(folder, name)
                done.set_result(None)
            except BaseException as exc:  # handed to the caller of load()
                done.set_exception(exc)

        self._queue.put(load_here)
        done.result()

    def _load(self, folder: Path, name: str) -> None:
        from mlx.utils import tree_flatten
        from mlx_lm import load

        loaded: Any = load(str(folder), model_config=_rope_overrides(folder))
        model, wrapper = loaded[0], loaded[1]
        self._hf_tokenizer = getattr(wrapper, "_tokenizer", wrapper)
        params: list[Any] = list(tree_flatten(model.parameters()))
        count = sum(int(v.size) for _, v in params)
        size = sum(int(v.nbytes) for _, v in params)
        args = getattr(model, "args", None)
        self._info = ModelInfo(
            id=name, backend=self.backend, path=str(folder),
            family=str(getattr(args, "model_type", "unknown")), format="mlx",
            parameter_count=count, quantization=str(params[0][1].dtype).removeprefix("mlx.core."),
            context_length=self.options.context_length
            or int(getattr(args, "max_position_embeddings", 2048) or 2048),
            embedding_length=int(getattr(args, "hidden_size", 0) or 0), size_bytes=size,
            vocab_size=int(getattr(args, "vocab_size", 0) or 0),
            digest=hashlib.sha256(str(folder.resolve()).encode()).hexdigest(),
            chat_template=str(getattr(self._hf_tokenizer, "chat_template", "") or ""),
        )
        self._model = model

    @property
    def ready(self) -> bool:
        return self._model is not None

    def tokenize(self, text: str) -> list[int]:
        self._require()
        bos = getattr(self._hf_tokenizer, "bos_token", None)
        add_special = not (bos and text.startswith(bos))
        return [int(t) for t in self._hf_tokenizer(text, add_special_tokens=add_special)
                ["input_ids"]]

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        from openpto.core.generate import build_chat_prompt

        self._require()
        return build_chat_prompt(self._hf_tokenizer, messages)

    def _require(self) -> None:
        if self._model is None:
            raise BackendUnavailable("the model is still loading")

    def _eos_ids(self) -> set[int]:
        eos = getattr(self._hf_tokenizer, "eos_token_id", None)
        return {int(eos)} if eos is not None else set()

    def _tokenizer_for_text(self) -> Any:
        return self._hf_tokenizer

    def chat_prompt_with_tools(self, messages: Sequence[dict[str, Any]],
                               tools: Sequence[Any] = ()) -> str:
        from openpto.engines.tool_calls import chat_prompt

        self._require()
        return chat_prompt(self._hf_tokenizer, messages, tools)

    def constraint(self, grammar: str) -> TokenConstraint:
        from openpto.engines.grammar import GrammarCompiler

        self._require()
        if self._grammars is None:
            self._grammars = GrammarCompiler(self._hf_tokenizer, self.info.vocab_size or None)
        return self._grammars.constraint(grammar)  # type: ignore[no-any-return]

    def _token_ids(self, prompt_ids: list[int], params: SamplingParams,
                   constraint: TokenConstraint | None = None) -> Iterator[int]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        if params.seed is not None:
            mx.random.seed(params.seed)
        sampler = make_sampler(temp=params.temperature, top_p=params.top_p, min_p=params.min_p,
                               top_k=params.top_k)
        processors = make_logits_processors(
            repetition_penalty=params.repetition_penalty
            if params.repetition_penalty != 1.0 else None,
            repetition_context_size=len(prompt_ids) + params.max_tokens)
        if constraint is not None:
            processors = [*processors, _grammar_processor(constraint)]
        room = self.info.context_length - len(prompt_ids)
        for token, _ in generate_step(mx.array(prompt_ids), self._model,
                                      max_tokens=min(params.max_tokens, room), sampler=sampler,
                                      logits_processors=processors):
            yield int(token)

    def _embed(self, texts: Sequence[str]) -> Embeddings:
        import mlx.core as mx

        self._require()
        vectors: list[list[float]] = []
        total = 0
        for text in texts:
            ids = self._hf_tokenizer(text)["input_ids"][: self.info.context_length] or [0]
            total += len(ids)
            hidden = self._model.model(mx.array([ids]))[0].astype(mx.float32)
            pooled = hidden.mean(axis=0)
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled), 1e-12)
            vectors.append([float(x) for x in pooled.tolist()])
        return Embeddings(vectors, total)

    def embed(self, texts: Sequence[str]) -> concurrent.futures.Future[Embeddings]:
        self._require()
        return super().embed(texts)


def _grammar_processor(constraint: Any) -> Any:
    """An mlx-lm logits processor applying ``constraint`` (a ``GrammarConstraint``).

    mlx-lm calls processors with every token so far, the previous sample last, before each
    sample: the matcher takes that token, then masks. (Reading the token waits for the step
    that made it, which gives up mlx-lm's overlap of one step with the next.)"""
    import mlx.core as mx
    import numpy as np

    started = [False]

    def process(tokens: Any, logits: Any) -> Any:
        if started[0]:
            constraint.accept(int(tokens[-1].item()))
        started[0] = True
        allowed = constraint.allowed()
        vocab = logits.shape[-1]
        if allowed.shape[0] < vocab:
            allowed = np.concatenate([allowed, np.zeros(vocab - allowed.shape[0], dtype=bool)])
        return mx.where(mx.array(allowed[:vocab]), logits, mx.array(-float("inf"), logits.dtype))

    return process
