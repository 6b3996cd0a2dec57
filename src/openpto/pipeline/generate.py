"""Recorded generation workflows: ``generate`` (one prompt) and ``speculative`` (with a draft).

``resolve_draft(spec, target)`` turns a DRAFT argument into a ``core.drafts.Draft``:

- ``lookup`` or ``lookup:N``: prompt n-gram lookup, n-grams of at most N tokens (default 3);
- ``self:layers=K``: the target's first K decoder layers, its final norm and shared head;
- ``self:int4`` / ``self:int8``: a copy of the target quantized with RTN (int4: group 64,
  asymmetric; int8: per channel, symmetric) on packed kernels where the device has them;
- anything else: a MODEL argument loaded like the target, which must share its tokenizer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
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
    StepRecord,
    collect,
    encode_prompt,
    generate_stream,
    generate_text,
)
from openpto.core.sampling import SamplingParams
from openpto.core.speculative import SpeculativeStats, speculative_stream
from openpto.errors import UsageError
from openpto.pipeline.common import Workflow, open_run
from openpto.profiling import kernel_summary
from openpto.progress import ProgressReporter

if TYPE_CHECKING:
    from openpto.models import LoadedModel
    from openpto.store import Store

OnText = Callable[[str], None]


def _default_model(spec: str | None) -> str:
    from openpto.models import DEFAULT_ALIAS

    return spec or DEFAULT_ALIAS


def _measure_details(loaded: LoadedModel, **extra: Any) -> dict[str, Any]:
    return {
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "kernels": kernel_summary(loaded.model),
        "synchronized": True,
        **extra,
    }


def _stream_text(records: Iterator[StepRecord], on_text: OnText | None) -> GenerationResult:
    def forward() -> Iterator[StepRecord]:
        for record in records:
            if on_text is not None and record.text:
                on_text(record.text)
            yield record

    return collect(forward())


def generate(
    model_spec: str | None,
    prompt: str,
    params: SamplingParams,
    *,
    chat: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    backend: str = "torch",
    on_text: OnText | None = None,
    progress: ProgressReporter | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Generate from one prompt, calling ``on_text`` with each text delta; recorded as a run.

    ``backend`` is ``torch`` (this process's model, the default) or any name in
    ``engines.BACKENDS`` (``llamacpp``, ``mlx``), which streams from that engine instead.
    Returns ``text``, ``tokens``, ``prompt_tokens``, ``finish_reason``, ``ttft_ms``,
    ``tokens_per_second`` (generated tokens / wall time including the prefill),
    ``decode_tokens_per_second`` and ``run_id``.
    """
    config = {"prompt": prompt, "chat": chat, "device": device, "dtype": dtype,
              "sampling": params.to_dict()}
    if backend != "torch":
        config["backend"] = backend
        with open_run("generate", _default_model(model_spec), config, store=store,
                      progress=progress) as wf:
            return _generate_on_engine(wf, backend, model_spec, prompt, params, chat=chat,
                                       device=device, dtype=dtype, on_text=on_text)
    with open_run("generate", _default_model(model_spec), config, store=store,
                  progress=progress) as wf:
        loaded = wf.load_model(model_spec, dtype=dtype, device=device)
        ids = encode_prompt(loaded.tokenizer, prompt, chat=_use_chat(loaded, chat))
        with wf.run.trace("generate", prompt_tokens=len(ids)) as attrs:
            result = _stream_text(
                generate_stream(loaded.model, loaded.tokenizer, ids, params), on_text
            )
            attrs.update(tokens=result.tokens, finish_reason=result.finish_reason)
        details = _measure_details(loaded, prompt_tokens=len(ids), tokens=result.tokens,
                                   clock="wall time from start to last token, prefill included")
        wf.run.metric("tokens_per_second", result.tokens_per_second, "tokens/s", details)
        wf.run.metric("ttft_ms", result.ttft_s * 1e3, "ms", details)
        wf.run.metric("tokens", result.tokens, "tokens", details)
        return {
            "text": result.text,
            "tokens": result.tokens,
            "prompt_tokens": len(ids),
            "finish_reason": result.finish_reason,
            "ttft_ms": result.ttft_s * 1e3,
            "tokens_per_second": result.tokens_per_second,
            "decode_tokens_per_second": result.decode_tokens_per_second,
            "run_id": wf.run_id,
        }


def _generate_on_engine(wf: Workflow, backend: str, model_spec: str | None, prompt: str,
                        params: SamplingParams, *, chat: bool, device: str, dtype: str,
                        on_text: OnText | None) -> dict[str, Any]:
    """``generate`` through a generation engine (llama.cpp, MLX): the engine samples, tokenizes
    and applies the chat template itself; the same result keys and metrics as the torch path."""
    from openpto.engines import EngineOptions, StreamEvent, make_engine, run_to_completion

    engine = make_engine(backend, model_spec, EngineOptions(dtype=dtype, device=device))
    try:
        with wf.run.trace("load", backend=backend):
            engine.load()
        use_chat = chat and bool(engine.info.chat_template)
        text = (engine.chat_prompt([{"role": "user", "content": prompt}]) if use_chat
                else prompt)
        ids = engine.tokenize(text)
        if not ids:
            raise UsageError("the prompt is empty")

        def forward(event: StreamEvent) -> None:
            if on_text is not None and event.text:
                on_text(event.text)

        with wf.run.trace("generate", prompt_tokens=len(ids)) as attrs:
            result = run_to_completion(engine, ids, params, forward)
            attrs.update(tokens=result.tokens, finish_reason=result.finish_reason)
    finally:
        engine.close()
    timings = result.timings
    started = timings.started if timings and timings.started is not None else 0.0
    elapsed = (timings.finished or started) - started if timings else 0.0
    ttft = (timings.first_token or started) - started if timings else 0.0
    decode = sum(timings.token_gaps) if timings else 0.0
    tokens_per_second = result.tokens / elapsed if elapsed > 0 else 0.0
    out = {
        "text": result.text,
        "tokens": result.tokens,
        "prompt_tokens": len(ids),
        "finish_reason": result.finish_reason,
        "ttft_ms": ttft * 1e3,
        "tokens_per_second": tokens_per_second,
        "decode_tokens_per_second": (len(timings.token_gaps) / decode
                                     if timings and decode > 0 else 0.0),
        "backend": backend,
        "run_id": wf.run_id,
    }
    details = {"backend": backend, "model": engine.info.id, "format": engine.info.format,
               "quantization": engine.info.quantization, "prompt_tokens": len(ids),
               "tokens": result.tokens,
               "clock": "wall time from start to last token, prefill included"}
    wf.run.metric("tokens_per_second", tokens_per_second, "tokens/s", details)
    wf.run.metric("ttft_ms", ttft * 1e3, "ms", details)
    wf.run.metric("tokens", result.tokens, "tokens", details)
    return out


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


def speculative(
    model_spec: str | None,
    draft_spec: str,
    prompt: str,
    params: SamplingParams,
    *,
    gamma: int = 4,
    adaptive: bool = True,
    chat: bool = True,
    baseline: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    on_text: OnText | None = None,
    progress: ProgressReporter | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Speculative generation, and (``baseline=True``) the target alone on the same prompt.

    Returns ``text``, the acceptance metrics, ``tokens_per_second``, ``baseline_tokens_per_second``,
    ``speedup``, ``identical_to_target`` (token equality with the baseline; only meaningful for
    greedy params), ``draft``, ``gamma`` and ``run_id``.
    """
    if gamma < 1:
        raise UsageError(f"gamma must be >= 1 (draft tokens per step), got {gamma}")
    config = {"draft": draft_spec, "gamma": gamma, "adaptive": adaptive, "prompt": prompt,
              "chat": chat, "device": device, "dtype": dtype, "sampling": params.to_dict()}
    with open_run("speculative", _default_model(model_spec), config, store=store,
                  progress=progress) as wf:
        target = wf.load_model(model_spec, dtype=dtype, device=device)
        with wf.run.trace("draft", spec=draft_spec) as attrs:
            draft, draft_info = resolve_draft(draft_spec, target, wf, dtype=dtype)
            attrs.update(draft_info)
        ids = encode_prompt(target.tokenizer, prompt, chat=_use_chat(target, chat))
        stats = SpeculativeStats()
        with wf.run.trace("speculative", prompt_tokens=len(ids)) as attrs:
            records = speculative_stream(target.model, target.tokenizer, draft, ids, params,
                                         gamma=gamma, adaptive=adaptive, stats=stats)
            result = _stream_text(records, on_text)
            attrs.update(tokens=result.tokens, **stats.to_dict())
        out: dict[str, Any] = {
            "text": result.text,
            "tokens": result.tokens,
            **stats.to_dict(),
            "tokens_per_second": result.tokens_per_second,
            "baseline_tokens_per_second": None,
            "speedup": None,
            "identical_to_target": None,
        }
        if baseline:
            with wf.run.trace("baseline", prompt_tokens=len(ids)):
                plain = generate_text(target.model, target.tokenizer, ids, params)
            out["baseline_tokens_per_second"] = plain.tokens_per_second
            out["speedup"] = result.tokens_per_second / plain.tokens_per_second
            out["identical_to_target"] = plain.token_ids == result.token_ids
        details = _measure_details(target, draft=draft_info, gamma=gamma, adaptive=adaptive,
                                   tokens=result.tokens, greedy=params.greedy)
        for name in ("draft_acceptance_rate", "mean_acceptance_length", "tokens_per_second",
                     "baseline_tokens_per_second", "speedup"):
            if out[name] is not None:
                unit = "tokens/s" if name.endswith("per_second") else ""
                wf.run.metric(name, out[name], unit, details)
        out.update(draft=draft_info, gamma=gamma, run_id=wf.run_id)
        return out

