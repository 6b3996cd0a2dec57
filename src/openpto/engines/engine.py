"""The generation interface every front end talks to, and the registry of backends.

Every backend (torch with continuous batching, llama.cpp, MLX) implements ``Engine``; the HTTP
routes and ``opt generate`` never ask which one they have. Backends are registered by name,
lazily, so that choosing ``--backend mlx`` imports mlx and nothing else.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

from openpto.core.sampling import SamplingParams, TokenConstraint
from openpto.core.steps import RequestRules, StepRecord
from openpto.engines.streams import RequestStream
from openpto.errors import BackendUnavailable, OptError, require
from openpto.registry import GENERATION_BACKENDS


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """What a front end passes to a backend besides the model."""

    dtype: str = "float32"
    device: str = "cpu"
    max_batch: int = 8
    draft: str | None = None
    threads: int | None = None
    context_length: int | None = None  # None: the model's own
    #: the torch backend's decoder for a lone request (``core.static_decode`` modes): "auto"
    #: replays a CUDA graph over a static cache on CUDA, as ``opt generate`` does
    decode: str = "auto"
    # Turns ``draft`` into a ``core.drafts.Draft`` for the torch backend:
    # ``(spec, target LoadedModel, dtype=...) -> (Draft, description)``. The front end passes
    # ``pipeline.generate.resolve_draft``; it lives above this layer because its self-quantized
    # drafts go through ``api.quantize_``.
    resolve_draft: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass
class ModelInfo:
    """What the model-listing routes (``/v1/models``, ``/api/tags``, ``/api/show``) report."""

    id: str
    backend: str
    path: str = ""
    family: str = "llama"
    format: str = "safetensors"
    parameter_count: int = 0
    quantization: str = "F32"
    context_length: int = 2048
    embedding_length: int = 0
    vocab_size: int = 0  # 0: unknown
    size_bytes: int = 0
    digest: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    chat_template: str = ""


@dataclasses.dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    draft_tokens: int = 0  # cumulative, speculative decoding only
    accepted_tokens: int = 0


@dataclasses.dataclass
class Embeddings:
    vectors: list[list[float]]
    tokens: int


class Engine(abc.ABC):
    """A loaded (or loading) model that generates for many concurrent requests."""

    backend: str = ""

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model (blocking; the app calls it off the event loop at start-up)."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True once ``load`` has finished and requests can be served."""

    @property
    @abc.abstractmethod
    def info(self) -> ModelInfo: ...

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model sees a prompt (a template's special tokens kept)."""

    @abc.abstractmethod
    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text of a conversation, through the model's chat template."""

    @abc.abstractmethod
    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: RequestStream,
               constraint: TokenConstraint | None = None) -> None:
        """Start generating; events go to ``stream``. Must not block on the model.

        ``constraint`` (from ``constraint()``) masks every next token of this request only."""

    #: whether ``constraint`` works: the backend lets each request's logits be masked
    supports_constraints: bool = False

    def constraint(self, grammar: str) -> TokenConstraint:
        """A fresh per-request mask for ``grammar`` (``engines.grammar`` Lark text)."""
        raise BackendUnavailable(
            f"the {self.backend} backend cannot constrain decoding (tool_choice required or "
            "named, response_format json_object/json_schema); serve with --backend torch")

    def chat_prompt_with_tools(self, messages: Sequence[dict[str, Any]],
                               tools: Sequence[Any] = ()) -> str:
        """The prompt of a conversation that may carry tools, tool calls and tool results
        (``engines.tool_calls``): here through the system block and plain messages."""
        from openpto.engines.tool_calls import plain_messages

        return self.chat_prompt(plain_messages(messages, tools))

    @abc.abstractmethod
    def embed(self, texts: Sequence[str]) -> concurrent.futures.Future[Embeddings]:
        """Mean-pooled, L2-normalised last hidden states, one vector per text."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Stop worker threads; pending requests end with ``finish_reason='cancelled'``."""


#: backend name -> Engine class taking ``(model_spec, options)``, filled through the
#: ``register_generation_backends`` plugin hook
BACKENDS = GENERATION_BACKENDS


def served_name(spec: str | None) -> str:
    """The model id clients see: an alias or hub id as given, a file or folder by its name."""
    from pathlib import Path

    if not spec:
        return "smollm2-135m"
    path = Path(spec).expanduser()
    if path.exists():
        return path.name.removesuffix(".gguf")
    return spec


def make_engine(backend: str, model: str | None, options: EngineOptions) -> Engine:
    factory: Callable[[str | None, EngineOptions], Engine] = BACKENDS.get(backend)
    return factory(model, options)


def engine_records(engine: Engine, prompt_ids: list[int], params: SamplingParams,
                   constraint: TokenConstraint | None = None,
                   ) -> Generator[StepRecord, None, None]:
    """One request's ``StepRecord``s from ``engine``, synchronously, as the engine pushes them.

    Engines push to a ``RequestStream`` bound to an event loop (the HTTP layer's); this drives a
    private loop between records. Stopping early cancels the request. A backend failure raises
    ``BackendUnavailable`` with the engine's message.
    """
    import asyncio

    loop = asyncio.new_event_loop()
    # Room for every record, so that each comes through with its own token id (the coalescing
    # bound protects the server's scheduler from slow clients; here the reader is the caller).
    stream = RequestStream(loop, max_pending=params.max_tokens + 2)
    try:
        engine.submit(prompt_ids, params, stream, constraint)
        while not stream.finished:
            for record in loop.run_until_complete(stream.next_events()):
                if record.finish_reason == "error":
                    raise BackendUnavailable(f"{engine.backend} backend: {record.error}")
                yield record
    finally:
        stream.cancel()  # a no-op once finished; stops the engine if the consumer left early
        loop.close()


# -- a one-sequence-at-a-time engine for backends that own their own decode loop -----------------


@dataclasses.dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    constraint: TokenConstraint | None = None


class SerialEngine(Engine):
    """Runs requests one after another on a worker thread (llama.cpp and MLX contexts are not
    safe to share between threads). Subclasses provide ``_token_ids`` (a generator of token ids
    for one request) and ``_embed``; stop strings, timings and cancellation are handled here."""

    #: ``require``'s arguments for the library the backend runs on: (module, extra, purpose)
    library: tuple[str, str, str]

    def __init__(self, model: str | None = None, options: EngineOptions | None = None) -> None:
        require(*self.library)  # fail before serving starts
        self.spec = model
        self.options = options or EngineOptions()
        self._info: ModelInfo | None = None
        self._queue: queue.Queue[_Job | Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running = 0
        self._draft_tokens = 0
        self._accepted_tokens = 0

    @property
    def info(self) -> ModelInfo:
        return self._info or ModelInfo(id=served_name(self.spec), backend=self.backend)

    def _start_worker(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"opt-{self.backend}", daemon=True)
        self._thread.start()

    @abc.abstractmethod
    def _token_ids(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[int]:
        """Sampled token ids, one at a time; the caller stops pulling when it is done."""

    @abc.abstractmethod
    def _eos_ids(self) -> set[int]: ...

    @abc.abstractmethod
    def _tokenizer_for_text(self) -> Any:
        """An object with ``decode(ids, skip_special_tokens=True)`` for ``TextStream``."""

    @abc.abstractmethod
    def _embed(self, texts: Sequence[str]) -> Embeddings: ...

    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: RequestStream,
               constraint: TokenConstraint | None = None) -> None:
        if constraint is not None and not self.supports_constraints:
            self.constraint("")  # raises: this backend's decode loop cannot take a mask
        self._queue.put(_Job(prompt_ids, params, stream, constraint))

    def embed(self, texts: Sequence[str]) -> concurrent.futures.Future[Embeddings]:
        future: concurrent.futures.Future[Embeddings] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(self._embed(texts))
            except Exception as exc:  # handed to the waiting request, which reports it
                future.set_exception(exc)

        self._queue.put(run)
        return future

    def stats(self) -> EngineStats:
        return EngineStats(self._running, self._queue.qsize(), self._draft_tokens,
                           self._accepted_tokens)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not isinstance(job, _Job):
                job()
                continue
            self._running = 1
            rules = RequestRules(self._tokenizer_for_text(), job.prompt_ids, job.params,
                                 self._eos_ids(), context_length=self.info.context_length,
                                 arrived=job.stream.arrived)
            try:
                self._run_job(job, rules)
            except OptError as exc:
                job.stream.push(rules.end("error", str(exc)))
            except Exception as exc:  # a backend crash ends this request, not the server
                job.stream.push(rules.end("error", f"{type(exc).__name__}: {exc}"))
            finally:
                self._running = 0

    def _run_job(self, job: _Job, rules: RequestRules) -> None:
        rules.start()
        # Only backends with supports_constraints take the extra argument.
        tokens = (self._token_ids(job.prompt_ids, job.params) if job.constraint is None
                  else self._token_ids(job.prompt_ids, job.params,  # type: ignore[call-arg]
                                       job.constraint))
        try:
            for token in tokens:
                if job.stream.cancelled:
                    job.stream.push(rules.end("cancelled"))
                    return
                record = rules.push(token)
                job.stream.push(record)
                if record.finish_reason is not None:
                    return
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
        # The backend stopped on its own (its context is full).
        job.stream.push(rules.end("length"))
