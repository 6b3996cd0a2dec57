"""Recorded generation workflows: ``generate`` (one prompt) and ``speculative`` (with a draft).

    from openpto.pipeline.generate import GenerationConfig, generate
    stream = generate("smollm2-135m", GenerationConfig(prompt="Hello", max_new_tokens=32))
    for record in stream:            # core.steps.StepRecord: token id, text, timings, memory
        print(record.text, end="")
    stream.result().to_dict()        # text, tokens, tokens_per_second, ..., run_id

``generate`` is the library's generation stack (``core.generate.token_steps`` ->
``core.steps.RequestRules`` -> records -> text) recorded as a ``generate`` run, or, with
``backend`` ``llamacpp``/``mlx``, the same records from that engine. Nothing starts until the
first record is asked for; the run is recorded when the stream ends (also when the consumer stops
early: ``finish_reason`` ``cancelled``).

``resolve_draft(spec, target)`` turns a DRAFT argument into a ``core.drafts.Draft``:

- ``lookup`` or ``lookup:N``: prompt n-gram lookup, n-grams of at most N tokens (default 3);
- ``self:layers=K``: the target's first K decoder layers, its final norm and shared head;
- ``self:int4`` / ``self:int8``: a copy of the target quantized with RTN (int4: group 64,
  asymmetric; int8: per channel, symmetric) on packed kernels where the device has them;
- anything else: a MODEL argument loaded like the target, which must share its tokenizer.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import torch

from openpto.core.drafts import (
    Draft,
    LookupDraft,
    ModelDraft,
    check_same_tokenizer,
    early_exit_model,
)
from openpto.core.generate import (
    GenerationResult,
    collect,
    encode_prompt,
    eos_ids,
    token_steps,
)
from openpto.core.sampling import SamplingParams
from openpto.core.speculative import SpeculativeStats, speculative_steps
from openpto.core.static_decode import DECODE_MODES, DecodeMode
from openpto.core.steps import RequestRules, StepRecord, stream_records
from openpto.errors import UsageError
from openpto.pipeline.common import Workflow, open_run
from openpto.profiling import kernel_summary, memory_probe
from openpto.progress import ProgressCallback

if TYPE_CHECKING:
    from openpto.models import LoadedModel
    from openpto.store import Store

_CLOCK = "wall time from start to last token, prefill included"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """One prompt's generation: sampling, chat formatting, and where the model runs."""

    type_name = "generation"
    version = 1

    #: the prompt text (wrapped in the chat template when ``chat`` and the tokenizer has one)
    prompt: str = ""
    #: at most this many new tokens
    max_new_tokens: int = 128
    #: 0 is greedy; higher is more random
    temperature: float = 0.0
    #: nucleus sampling mass in (0, 1]; 1 is off
    top_p: float = 1.0
    #: keep the K most likely tokens; 0 is off
    top_k: int = 0
    #: drop tokens below min_p x the top probability; 0 is off
    min_p: float = 0.0
    #: CTRL penalty on tokens already seen; 1 is off
    repetition_penalty: float = 1.0
    #: seed for reproducible sampling (None: fresh entropy)
    seed: int | None = None
    #: stop strings: the text ends just before the first one
    stop: tuple[str, ...] = ()
    #: format the prompt with the tokenizer's chat template (raw when it has none)
    chat: bool = True
    #: cpu, cuda, cuda:N or mps (a spec string only; a loaded model stays where it is)
    device: str = "cpu"
    #: float32, bfloat16 or float16 (a spec string only)
    dtype: str = "float32"
    #: generation engine: torch (this process) or llamacpp / mlx
    backend: str = "torch"
    #: torch decoder (core.static_decode): auto, dynamic, static, graph or compiled
    decode: str = "auto"

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        if self.decode not in DECODE_MODES:
            raise UsageError(f"decode must be one of {', '.join(DECODE_MODES)}, "
                             f"got {self.decode!r}")
        self.sampling()  # one clear error for a bad sampling value, at construction

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              seed=self.seed, max_tokens=self.max_new_tokens, stop=self.stop)

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["stop"] = list(self.stop)
        return {"type": self.type_name, "version": self.version, **fields}


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig(GenerationConfig):
    """Speculative generation: a draft proposes, the target verifies (torch backend only)."""

    type_name = "speculative"

    #: a MODEL sharing the tokenizer, self:int4, self:int8, self:layers=K or lookup[:N]
    draft: str = "lookup"
    #: draft tokens per verification step (the start value when adaptive)
    gamma: int = 4
    #: adapt gamma to the measured acceptance and costs as it runs
    adaptive: bool = True
    #: also time the target alone on the same prompt and compare
    baseline: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma < 1:
            raise UsageError(f"gamma must be >= 1 (draft tokens per step), got {self.gamma}")
        if self.backend != "torch":
            raise UsageError("speculative decoding runs on the torch backend only")


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """A finished ``generate`` run: ``to_dict`` has the ``opt generate --json`` keys."""

    text: str
    token_ids: list[int]
    tokens: int
    prompt_tokens: int
    finish_reason: str | None
    ttft_ms: float
    tokens_per_second: float
    decode_tokens_per_second: float
    peak_memory_bytes: int | None
    backend: str
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["token_ids"]
        return out


class Generation(Iterator[StepRecord]):
    """The records of one recorded generation, as they come. ``run_id`` is set once the run has
    started; ``result()`` drains what is left and returns the ``GenerateResult``."""

    def __init__(self, body: Callable[[Generation], Iterator[StepRecord]]) -> None:
        self.run_id: str | None = None
        self.summary: GenerateResult | None = None
        self._records = body(self)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> StepRecord:
        return next(self._records)

    def close(self) -> None:
        """Stop early; the run is recorded with what was generated."""
        close = getattr(self._records, "close", None)
        if close is not None:
            close()

    def result(self) -> GenerateResult:
        for _ in self:
            pass
        if self.summary is None:
            raise UsageError("the generation was closed before it started")
        return self.summary


def _default_model(spec: Any) -> str:
    from openpto.models import DEFAULT_ALIAS

    if spec is None:
        return DEFAULT_ALIAS
    return spec if isinstance(spec, str) else str(spec.name)


def _measure_details(loaded: LoadedModel, **extra: Any) -> dict[str, Any]:
    return {
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "kernels": kernel_summary(loaded.model),
        "synchronized": True,
        **extra,
    }


def _load(wf: Workflow, model: Any, config: GenerationConfig) -> LoadedModel:
    if model is None or isinstance(model, str):
        return wf.load_model(model, dtype=config.dtype, device=config.device)
    wf.store.update("runs", wf.run.id, {"model": model.name})
    return model  # type: ignore[no-any-return]


def _summarise(result: GenerationResult, backend: str, run_id: str) -> GenerateResult:
    return GenerateResult(
        text=result.text, token_ids=result.token_ids, tokens=result.tokens,
        prompt_tokens=result.prompt_tokens, finish_reason=result.finish_reason,
        ttft_ms=result.ttft_s * 1e3, tokens_per_second=result.tokens_per_second,
        decode_tokens_per_second=result.decode_tokens_per_second,
        peak_memory_bytes=result.peak_memory_bytes, backend=backend, run_id=run_id)


def _record_metrics(wf: Workflow, result: GenerationResult, details: dict[str, Any]) -> None:
    details = {**details, "prompt_tokens": result.prompt_tokens, "tokens": result.tokens,
               "clock": _CLOCK}
    wf.run.metric("tokens_per_second", result.tokens_per_second, "tokens/s", details)
    wf.run.metric("ttft_ms", result.ttft_s * 1e3, "ms", details)
    wf.run.metric("tokens", result.tokens, "tokens", details)


def generate(
    model: str | LoadedModel | None,
    config: GenerationConfig,
    *,
    progress: ProgressCallback | None = None,
    store: Store | None = None,
) -> Generation:
    """Generate from ``config.prompt``: an iterator of ``StepRecord`` (see the module docstring).

    ``model`` is a MODEL spec (loaded with ``config.device``/``config.dtype``) or a loaded model
    (torch backend). Silent without ``progress``.
    """
    if config.backend != "torch" and not (model is None or isinstance(model, str)):
        raise UsageError(f"the {config.backend} backend loads its own model: pass a MODEL spec")

    def body(handle: Generation) -> Iterator[StepRecord]:
        with open_run("generate", _default_model(model), config.to_dict(), store=store,
                      progress=progress) as wf:
            handle.run_id = wf.run_id
            engine: Any = None
            try:
                if config.backend == "torch":
                    records, prompt_tokens, details = _torch_records(wf, model, config)
                else:
                    spec = model if model is None or isinstance(model, str) else None
                    engine, records, prompt_tokens, details = _engine_records(wf, spec, config)
                seen: list[StepRecord] = []
                with wf.run.trace("generate", prompt_tokens=prompt_tokens) as attrs:
                    try:
                        for record in records:
                            seen.append(record)
                            yield record
                    except GeneratorExit:
                        # The consumer stopped early: the request ends as cancelled and the run
                        # is recorded with what it produced (a generator may not yield again).
                        seen.append(_cancelled(seen, prompt_tokens))
                    finally:
                        records.close()
                    result = collect(seen)
                    attrs.update(tokens=result.tokens, finish_reason=result.finish_reason)
            finally:
                if engine is not None:
                    engine.close()
            _record_metrics(wf, result, details)
            handle.summary = wf.set_result(_summarise(result, config.backend, wf.run_id))

    return Generation(body)


def _mode(decode: str) -> DecodeMode:
    return decode  # type: ignore[return-value]  # checked by GenerationConfig


def _cancelled(seen: list[StepRecord], prompt_tokens: int) -> StepRecord:
    last = seen[-1] if seen else StepRecord()
    return StepRecord(finish_reason="cancelled", prompt_tokens=prompt_tokens,
                      index=last.generated, ttft_s=last.ttft_s, elapsed_s=last.elapsed_s)


def _torch_records(
    wf: Workflow, model: str | LoadedModel | None, config: GenerationConfig
) -> tuple[Generator[StepRecord, None, None], int, dict[str, Any]]:
    loaded = _load(wf, model, config)
    ids = encode_prompt(loaded.tokenizer, config.prompt, chat=_use_chat(loaded, config.chat))
    params = config.sampling()
    rules = RequestRules(loaded.tokenizer, ids, params, eos_ids(loaded.model, loaded.tokenizer),
                         memory=memory_probe(loaded.device))
    steps = token_steps(loaded.model, ids, params, decode=_mode(config.decode))
    records = stream_records(steps, rules)
    return records, len(ids), _measure_details(loaded, decode=config.decode)


def _engine_records(
    wf: Workflow, model: str | None, config: GenerationConfig
) -> tuple[Any, Generator[StepRecord, None, None], int, dict[str, Any]]:
    """A generation engine (llama.cpp, MLX) and its records: the engine samples, tokenizes and
    applies the chat template itself; its records come from the same ``RequestRules``."""
    from openpto.engines import EngineOptions, engine_records, make_engine

    backend = config.backend
    engine = make_engine(backend, model, EngineOptions(dtype=config.dtype, device=config.device))
    try:
        with wf.run.trace("load", backend=backend):
            engine.load()
        use_chat = config.chat and bool(engine.info.chat_template)
        text = (engine.chat_prompt([{"role": "user", "content": config.prompt}]) if use_chat
                else config.prompt)
        ids = engine.tokenize(text)
        if not ids:
            raise UsageError("the prompt is empty")
    except BaseException:
        engine.close()
        raise
    details = {"backend": backend, "model": engine.info.id, "format": engine.info.format,
               "quantization": engine.info.quantization}
    return engine, engine_records(engine, ids, config.sampling()), len(ids), details


def _use_chat(loaded: LoadedModel, chat: bool) -> bool:
    # --chat is the default; a tokenizer without a template falls back to the raw prompt
    # rather than failing, since base models have none.
    return chat and bool(getattr(loaded.tokenizer, "chat_template", None))


def resolve_draft(
    spec: str, target: LoadedModel, wf: Workflow | None = None, *, dtype: str = "float32"
) -> tuple[Draft, dict[str, Any]]:
    """A ``Draft`` for a DRAFT argument (see the module docstring) and a description of it."""
    if spec == "lookup" or spec.startswith("lookup:"):
        n = _int_suffix(spec, "lookup:", default=3)
        return LookupDraft(max_ngram=n), {"kind": "lookup", "max_ngram": n}
    if spec.startswith("self:layers="):
        k = _int_suffix(spec, "self:layers=", default=None)
        view = early_exit_model(target.model, k)
        return ModelDraft(view, spec), {"kind": "early-exit", "layers": k}
    if spec in ("self:int4", "self:int8"):
        return _self_quantized(spec, target)
    if spec.startswith("self:"):
        raise UsageError(
            f"unknown self draft {spec!r} (known: self:int4, self:int8, self:layers=K)"
        )
    if wf is None:
        from openpto.models import load_model

        loaded = load_model(spec, dtype=dtype, device=str(target.device))
    else:
        loaded = wf.load_model(spec, dtype=dtype, device=str(target.device))
        wf.store.update("runs", wf.run.id, {"model": target.name})
    check_same_tokenizer(target.tokenizer, loaded.tokenizer)
    info = {"kind": "model", "name": loaded.name, "parameters": loaded.num_parameters,
            "kernels": kernel_summary(loaded.model)}
    return ModelDraft(loaded.model, loaded.name), info


def _int_suffix(spec: str, prefix: str, default: int | None) -> int:
    text = spec[len(prefix):] if spec.startswith(prefix) else ""
    if not text and default is not None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{spec!r}: expected an integer after {prefix!r}") from None


def _self_quantized(spec: str, target: LoadedModel) -> tuple[Draft, dict[str, Any]]:
    from openpto.api import quantize_
    from openpto.core.quant import RTNConfig
    from openpto.kernels import swap_to_packed

    bits = 4 if spec == "self:int4" else 8
    config = (RTNConfig(bits=4, group_size=64, symmetric=False) if bits == 4
              else RTNConfig(bits=8, group_size=None, symmetric=True))
    # deepcopy keeps a tied lm_head/embedding pair tied inside the copy; the target is untouched.
    model = copy.deepcopy(target.model)
    result = quantize_(model, config)
    swap_to_packed(model, result.quantized_weights())
    _pack_head(model, config)
    return ModelDraft(model, spec), {"kind": "self-quantized", "config": config.to_dict(),
                                     "head": "quantized", "kernels": kernel_summary(model)}


def _pack_head(model: Any, config: Any) -> None:
    """Quantize the draft's lm_head too: in a small model the vocabulary projection is a large
    share of each step (49152 x 576 in SmolLM2-135M), and a draft only needs its argmax to agree
    often, not exact logits."""
    from openpto.core.quant import quantize_weight
    from openpto.kernels import QuantLinear

    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return
    weight = head.weight.detach()
    qw = quantize_weight(weight.float(), config.bits, config.group_size, config.symmetric)
    packed = QuantLinear(qw, head.bias, dtype=weight.dtype, device=weight.device)
    model.set_output_embeddings(packed)  # unties it from the embeddings in this copy only


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """A finished ``speculative`` run: ``to_dict`` has the ``opt speculative --json`` keys."""

    text: str
    tokens: int
    stats: dict[str, Any]
    tokens_per_second: float
    baseline_tokens_per_second: float | None
    speedup: float | None
    identical_to_target: bool | None
    draft: dict[str, Any]
    gamma: int
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": self.tokens, **self.stats,
                "tokens_per_second": self.tokens_per_second,
                "baseline_tokens_per_second": self.baseline_tokens_per_second,
                "speedup": self.speedup, "identical_to_target": self.identical_to_target,
                "draft": self.draft, "gamma": self.gamma, "run_id": self.run_id}


def speculative(
    model: str | LoadedModel | None,
    config: SpeculativeConfig,
    *,
    on_record: Callable[[StepRecord], None] | None = None,
    progress: ProgressCallback | None = None,
    store: Store | None = None,
) -> SpeculativeResult:
    """Speculative generation, and (``config.baseline``) the target alone on the same prompt.

    Both run on the generation stack: ``core.speculative.speculative_steps`` and
    ``core.generate.token_steps``, each through its own ``RequestRules``. ``identical_to_target``
    is token equality with the baseline (only meaningful for greedy sampling).
    """
    with open_run("speculative", _default_model(model), config.to_dict(), store=store,
                  progress=progress) as wf:
        target = _load(wf, model, config)
        with wf.run.trace("draft", spec=config.draft) as attrs:
            draft, draft_info = resolve_draft(config.draft, target, wf, dtype=config.dtype)
            attrs.update(draft_info)
        ids = encode_prompt(target.tokenizer, config.prompt, chat=_use_chat(target, config.chat))
        params = config.sampling()
        eos = eos_ids(target.model, target.tokenizer)
        stats = SpeculativeStats()
        with wf.run.trace("speculative", prompt_tokens=len(ids)) as attrs:
            steps = speculative_steps(target.model, draft, ids, params, gamma=config.gamma,
                                      adaptive=config.adaptive, stats=stats)
            rules = RequestRules(target.tokenizer, ids, params, eos)
            result = collect(_observed(stream_records(steps, rules), on_record))
            attrs.update(tokens=result.tokens, **stats.to_dict())
        baseline_rate = speedup = identical = None
        if config.baseline:
            with wf.run.trace("baseline", prompt_tokens=len(ids)):
                rules = RequestRules(target.tokenizer, ids, params, eos)
                plain = collect(stream_records(
                    token_steps(target.model, ids, params, decode=_mode(config.decode)), rules))
            baseline_rate = plain.tokens_per_second
            speedup = result.tokens_per_second / plain.tokens_per_second
            identical = plain.token_ids == result.token_ids
        out = SpeculativeResult(
            text=result.text, tokens=result.tokens, stats=stats.to_dict(),
            tokens_per_second=result.tokens_per_second,
            baseline_tokens_per_second=baseline_rate, speedup=speedup,
            identical_to_target=identical, draft=draft_info, gamma=config.gamma,
            run_id=wf.run_id)
        details = _measure_details(target, draft=draft_info, gamma=config.gamma,
                                   adaptive=config.adaptive, tokens=result.tokens,
                                   greedy=params.greedy)
        values = out.to_dict()
        for name in ("draft_acceptance_rate", "mean_acceptance_length", "tokens_per_second",
                     "baseline_tokens_per_second", "speedup"):
            if values[name] is not None:
                unit = "tokens/s" if name.endswith("per_second") else ""
                wf.run.metric(name, values[name], unit, details)
        return wf.set_result(out)


def _observed(records: Iterator[StepRecord],
              on_record: Callable[[StepRecord], None] | None) -> Iterator[StepRecord]:
    for record in records:
        if on_record is not None:
            on_record(record)
        yield record
