"""Batch-1 decoding over a preallocated (static) KV cache, replayed as one CUDA graph per token.

Why: eager decoding of an 8B model on an H200 spends longer launching several hundred small
kernels from Python than the GPU spends reading the weights (37.6 tokens/s eager against a 275
tokens/s bandwidth floor, docs/benchmarks.md). A decode step whose shapes never change -- the token
id in a fixed buffer, its position in another, keys and values written in place into a cache sized
for the whole request -- can be captured once as a CUDA graph and replayed with one launch.

Public interface (``core.generate.token_steps`` is the caller, for ``opt generate``, ``opt profile``
and the server's lone requests):

- ``DecodeMode``: ``"dynamic"`` (the eager ``DynamicCache`` path of ``core.kvcache``),
  ``"static"`` (a transformers ``StaticCache``, the decode step run eagerly: the same function the
  graph captures, so CPU tests check exactly what the GPU replays), ``"graph"`` (static cache, the
  step captured as a ``torch.cuda.CUDAGraph`` after ``WARMUP_STEPS`` eager steps) and ``"auto"``
  (``"graph"`` for a CUDA model whose cache layers are all plain ``StaticLayer``, else
  ``"dynamic"``). ``"compiled"`` is ``"graph"`` with the step first run through ``torch.compile``
  (fused element-wise work between the matmuls, at the price of tens of seconds of compilation
  on the first request). When the graph path cannot be used -- no CUDA, a cache layer that keeps
  Python state, a failed capture -- decoding falls back to an eager path and the reason is logged
  once.
- ``open_decoder(model, tokens, mode, capacity=None) -> Decoder``: ``prefill(ids [1, T]) ->
  logits [1, V]`` then ``step(ids [1, 1]) -> logits [1, V]`` (float32; a graph replay returns
  the same buffer every step, valid until the next call), ``close()`` when the request ends.
  Static decoders are kept per model and reused (graph included) by later requests that fit
  their capacity and need at least half of it, as long as no parameter or buffer of the model
  has been replaced since.
- ``kept_decoder(model)``: the static decoder kept for ``model``, if any (benchmarks check that
  its ``graph`` was captured); ``release_static_decoders()`` drops them all (cache and graph
  memory).

Sampling, repetition penalty, stop strings and end-of-sequence handling stay outside the graph, on
the returned logits, so every mode emits the tokens ``core.sampling`` picks from those logits.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Literal, Protocol

import torch

from openpto.core.kvcache import forward_logits, new_cache
from openpto.errors import UsageError

DecodeMode = Literal["auto", "dynamic", "static", "graph", "compiled"]
DECODE_MODES: tuple[str, ...] = ("auto", "dynamic", "static", "graph", "compiled")
#: eager steps on the capture stream before capture: they run the lazy set-up (cuBLAS workspaces,
#: Triton compilation, split-K scratch buffers) that must not happen inside a capture
WARMUP_STEPS = 2
#: static caches are sized in multiples of this, so requests of similar length share one graph
CAPACITY_STEP = 256
#: above this many tokens "auto" keeps the dynamic cache: a static one is allocated in full and
#: every step attends over all of it
AUTO_MAX_TOKENS = 8192

_log = logging.getLogger(__name__)
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        _log.warning(message)


class Decoder(Protocol):
    def prefill(self, ids: torch.Tensor) -> torch.Tensor: ...

    def step(self, ids: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


class DynamicDecoder:
    """The eager path: a ``DynamicCache`` that grows by one position per step."""

    mode = "dynamic"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache = new_cache(model)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return forward_logits(self.model, ids, self.cache)[:, -1]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return forward_logits(self.model, ids, self.cache)[:, -1]

    def close(self) -> None:
        self.cache = None


def _fingerprint(model: torch.nn.Module) -> tuple[int, ...]:
    # A captured graph reads weights by address: a swapped Linear or a dtype change must rebuild.
    tensors = [*model.parameters(), *model.buffers()]
    return tuple(t.data_ptr() for t in tensors)


def _static_cache(model: torch.nn.Module, capacity: int) -> Any:
    from transformers import StaticCache

    config: Any = model.config
    return StaticCache(config=config, max_cache_len=capacity)


def graph_blocker(cache: Any) -> str | None:
    """Why replaying a captured step over ``cache`` would be wrong, or ``None`` if it is safe.

    Plain ``StaticLayer``s keep their fill level in a device tensor that the step advances in
    place; sliding-window layers also keep a Python counter that a replay would never advance.
    """
    from transformers.cache_utils import StaticLayer

    layers = getattr(cache, "layers", None)
    if not layers:
        return "this transformers release has no per-layer static cache"
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not StaticLayer})
    if odd:
        return f"cache layers of type {', '.join(odd)} keep host-side state"
    return None


def _decode_step(
    model: torch.nn.Module, cache: Any, ids: torch.Tensor, position: torch.Tensor
) -> torch.Tensor:
    logits = forward_logits(model, ids, cache, position_ids=position)
    position.add_(1)
    return logits[:, -1]


class StaticDecoder:
    """Prefill and one-token steps over a ``StaticCache``; the step is optionally a CUDA graph.

    The step reads the token from ``self.ids`` and its position from ``self.position`` and
    advances the position in place, so a replay needs no host-side bookkeeping at all.
    """

    def __init__(self, model: torch.nn.Module, capacity: int, mode: str = "graph") -> None:
        device = next(model.parameters()).device
        self.capacity = capacity
        self.cache = _static_cache(model, capacity)
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.fingerprint = _fingerprint(model)
        #: the mode asked for; ``mode`` says what runs (a failed capture falls back to "static")
        self.requested = mode
        self.use_graph = mode in ("graph", "compiled") and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.use_graph else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.eager_steps = 0
        self.busy = False
        self.compiled = mode == "compiled" and self.use_graph
        # dynamic=False: one token, one cache length; the graph is captured from this code.
        self._step_fn: Any = torch.compile(_decode_step, dynamic=False) if self.compiled else (
            _decode_step
        )
        self._model = weakref.ref(model)

    @property
    def mode(self) -> str:
        if self.use_graph:
            return "compiled" if self.compiled else "graph"
        return "static"

    @property
    def model(self) -> torch.nn.Module:
        model = self._model()
        if model is None:
            raise UsageError("the model of this decoder no longer exists")
        return model

    def _step_once(self) -> torch.Tensor:
        model = self.model
        if not self.compiled:
            return _decode_step(model, self.cache, self.ids, self.position)
        # Graph breaks at opaque kernels (the Triton int4 matmuls) resume inside every decoder
        # layer, and dynamo specialises those frames on the layer index: allow an entry per layer
        # (the default limit of 8 left the other layers uncompiled).
        layers = int(getattr(model.config, "num_hidden_layers", 32))
        limit = max(torch._dynamo.config.recompile_limit, 2 * layers + 8)
        with torch._dynamo.config.patch(recompile_limit=limit):
            out: torch.Tensor = self._step_fn(model, self.cache, self.ids, self.position)
        return out

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length >= self.capacity:
            raise UsageError(f"a {length}-token prompt does not fit a {self.capacity}-token cache")
        # Only the fill level matters: stale keys past it are masked out and overwritten.
        self.cache.reset()
        positions = torch.arange(length, device=ids.device).unsqueeze(0)
        logits = forward_logits(self.model, ids, self.cache, position_ids=positions)
        self.position.fill_(length)
        return logits[:, -1]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids.view(1, 1))
        if self.graph is not None:
            self.graph.replay()
            assert self.out is not None
            return self.out
        if not self.use_graph:
            return _decode_step(self.model, self.cache, self.ids, self.position)
        if self.eager_steps < WARMUP_STEPS:
            self.eager_steps += 1
            return self._on_capture_stream(self._step_once)
        self._capture()
        if self.graph is None:
            return _decode_step(self.model, self.cache, self.ids, self.position)
        return self.step(ids)

    def _on_capture_stream(self, fn: Any) -> torch.Tensor:
        assert self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out: torch.Tensor = fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                out = self._step_once()
        except Exception as exc:  # any failure: decode eagerly over the same cache instead
            self.use_graph = self.compiled = False
            _log_once(f"CUDA graph capture failed, decoding eagerly over a static cache: {exc}")
            return
        # Capture records kernels without running them: the cache and position are unchanged.
        self.graph, self.out = graph, out

    def close(self) -> None:
        self.busy = False


_DECODERS: weakref.WeakKeyDictionary[torch.nn.Module, StaticDecoder] = (
    weakref.WeakKeyDictionary()
)


def kept_decoder(model: torch.nn.Module) -> StaticDecoder | None:
    """The static decoder kept for ``model`` (``.graph`` is set once a step has been captured)."""
    return _DECODERS.get(model)


def release_static_decoders() -> None:
    """Forget every kept static decoder, freeing its cache and graph memory."""
    _DECODERS.clear()


def _capacity(tokens: int) -> int:
    return -(-tokens // CAPACITY_STEP) * CAPACITY_STEP


def _static_decoder(model: torch.nn.Module, tokens: int, mode: str) -> StaticDecoder:
    kept = _DECODERS.get(model)
    if (
        kept is not None
        and not kept.busy
        and kept.requested == mode
        and kept.capacity >= tokens
        # every step attends over the whole cache: a much larger one would slow this request
        and kept.capacity <= 2 * _capacity(tokens)
        and kept.fingerprint == _fingerprint(model)
    ):
        decoder = kept
    else:
        decoder = StaticDecoder(model, _capacity(tokens), mode)
        if kept is None or not kept.busy:  # a request still running keeps its own decoder
            _DECODERS[model] = decoder
    decoder.busy = True
    return decoder


def open_decoder(model: torch.nn.Module, tokens: int, mode: str = "auto",
                 capacity: int | None = None) -> Decoder:
    """A decoder for one batch-1 request of at most ``tokens`` positions (prompt + new).

    ``capacity`` (default ``tokens``) sizes a static cache smaller than the whole request; the
    caller moves to a larger decoder when it is full (``core.generate.token_steps`` does).
    """
    if mode not in DECODE_MODES:
        raise UsageError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    if mode == "dynamic":
        return DynamicDecoder(model)
    device = next(model.parameters()).device
    if mode != "static" and device.type != "cuda":
        if mode != "auto":
            _log_once(f"CUDA graphs need a CUDA model, this one is on {device.type}: eager decode")
        return DynamicDecoder(model)
    if mode == "auto" and tokens > AUTO_MAX_TOKENS:
        return DynamicDecoder(model)
    try:
        blocker = graph_blocker(_static_cache(model, CAPACITY_STEP))
    except Exception as exc:  # a config transformers cannot build a static cache for
        _log_once(f"no static KV cache for {type(model).__name__} ({exc}): eager decode")
        return DynamicDecoder(model)
    if blocker is not None and mode != "static":
        _log_once(f"no CUDA graph decode for {type(model).__name__}: {blocker}")
        if mode == "auto":
            return DynamicDecoder(model)
    if blocker is not None:
        mode = "static"
    size = tokens if capacity is None else min(capacity, tokens)
    return _static_decoder(model, size, "graph" if mode == "auto" else mode)
