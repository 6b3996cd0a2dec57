"""``sparsify_model``: load -> calibration data -> prune layer by layer -> measure -> artifact.

One recorded ``sparsify`` run: a trace per stage and per decoder layer (each Linear's error and
measured sparsity, peak memory), metrics measured from the pruned weights (overall and per-layer
sparsity, N:M compliance, parameter and byte counts, the theoretical speed-up bounds), with
``eval_text`` the perplexity before and after, and a ``models`` row for the artifact.

The artifact stores the pruned Linears in compressed-tensors' ``sparse-bitmask`` layout
(``sparse-24-bitmask`` for 2:4): the kept values and one bit per weight, so the mask is exact and
the folder shrinks. In SparseGPT's joint mode it is a ``pack-quantized`` folder whose pruned
entries hold the zero-point code and dequantize to exactly 0. ``openpto.json`` records the
method, its config, the pattern, the measured sparsity and the ``sparse_format``.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openpto import __version__
from openpto.config import registered_config_types
from openpto.data import CALIBRATION_DEFAULT, EVALUATION_DEFAULT, TextSource
from openpto.errors import UsageError
from openpto.pipeline.common import Workflow, open_run
from openpto.progress import ProgressReporter

if TYPE_CHECKING:
    import torch

    from openpto.core.calibrate import CompressionResult, LayerEvent
    from openpto.core.sparsity import SparsityConfig, SparsitySummary
    from openpto.models import LoadedModel
    from openpto.store import Store

METHODS = ("magnitude", "wanda", "sparsegpt")


def make_config(
    method: str,
    sparsity: float | None = None,
    pattern: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
) -> SparsityConfig:
    """The config for a method name, as the CLI builds it (``--bits`` only for SparseGPT)."""
    from openpto.core.sparsity import SparseGPTConfig, SparsityConfig

    cls = registered_config_types().get(method)
    if cls is None or not issubclass(cls, SparsityConfig):
        raise UsageError(f"unknown pruning method {method!r} (known: {', '.join(METHODS)})")
    if sparsity is not None and pattern is not None:
        raise UsageError("give either --sparsity or --pattern, not both")
    if not issubclass(cls, SparseGPTConfig):
        if bits is not None or group_size is not None:
            raise UsageError(f"--bits/--group-size apply to sparsegpt only, not {method}")
        return cls(sparsity=sparsity, pattern=pattern)
    return cls(
        sparsity=sparsity, pattern=pattern, bits=bits, group_size=group_size, symmetric=symmetric
    )


def default_output(model_name: str, config: SparsityConfig) -> Path:
    from openpto.store import opt_home

    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_name).name or model_name).strip("-")
    shape = config.pattern.replace(":", "of") if config.pattern else f"s{config.sparsity:g}"
    bits = getattr(config, "bits", None)
    grid = ""
    if bits is not None:
        group = getattr(config, "group_size", None)
        grid = f"-w{bits}" + (f"g{group}" if group else "ch")
    return opt_home() / "artifacts" / f"{stem}-{config.type_name}-{shape}{grid}"


def sparsify_model(
    model_spec: str | None,
    config: SparsityConfig,
    *,
    calib: str | TextSource | None = None,
    samples: int = 128,
    calib_seq_len: int = 512,
    seed: int = 0,
    output: str | Path | None = None,
    eval_text: str | TextSource | None = None,
    eval_seq_len: int = 512,
    eval_max_tokens: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 8,
    progress: ProgressReporter | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Prune ``model_spec`` with ``config`` and write an artifact folder.

    Returns ``output``, ``method``, ``sparsity`` (measured over the pruned Linears), ``pattern``,
    ``target_sparsity``, ``nm_compliant``, ``params_pruned``, ``dense_bytes``,
    ``sparse_bytes`` (2:4 layout when every layer fits it, else a bitmask layout),
    ``speedup_bounds``, ``seconds`` (calibration and pruning), ``size_bytes_after``, ``run_id``,
    and with ``eval_text`` ``perplexity_before`` and ``perplexity_after``.
    """
    from openpto.core.sparsity.transforms import check_widths
    from openpto.pipeline.artifacts import check_output

    run_config = {
        **config.to_dict(), "samples": samples, "calib_seq_len": calib_seq_len, "seed": seed,
        "device": device, "dtype": dtype, "output": None if output is None else str(output),
    }
    with open_run("sparsify", model_spec, run_config, store=store, progress=progress) as wf:
        if samples < 1 or calib_seq_len < 2:
            raise UsageError("--samples must be at least 1 and --calib-seq-len at least 2")
        if output is not None:
            check_output(Path(output))
        loaded = wf.load_model(model_spec, dtype=dtype, device="cpu")
        out = Path(output) if output is not None else default_output(loaded.name, config)
        check_output(out)
        check_widths(loaded.model, config)
        result: dict[str, Any] = {"output": str(out), "method": config.type_name,
                                  "pattern": config.label}
        eval_ids = None
        if eval_text is not None:
            source = wf.load_text(eval_text, default=EVALUATION_DEFAULT)
            eval_ids = wf.tokenize(loaded.tokenizer, source, role="eval")
            result["perplexity_before"] = _perplexity(
                wf, loaded.model, eval_ids, eval_seq_len, eval_max_tokens, "before")

        calibration = _calibration(wf, loaded, config, calib, samples, calib_seq_len, seed)
        compressed = _prune(wf, loaded, config, calibration, device, batch_size)
        summary = _measure(wf, loaded, config, compressed)
        result.update(_summary_fields(config, summary), seconds=compressed.seconds)
        from openpto.pipeline.artifacts import round_to_stored

        # The model computes with exactly what the artifact stores from here on.
        stored = round_to_stored(loaded.model, compressed.quantized_weights())
        if eval_ids is not None:
            result["perplexity_after"] = _perplexity(
                wf, loaded.model, eval_ids, eval_seq_len, eval_max_tokens, "after")
        info = _save(wf, loaded, config, compressed, summary, out, result,
                     calib, samples, calib_seq_len, seed, stored)
        result["size_bytes_after"] = info.size_bytes
        result["run_id"] = wf.run_id
        return result


def _calibration(wf: Workflow, loaded: LoadedModel, config: SparsityConfig, calib: Any,
                 samples: int, seq_len: int, seed: int) -> torch.Tensor | None:
    from openpto.core.sparsity.transforms import needs_calibration

    if not needs_calibration(config):
        return None
    from openpto.data import calibration_batches

    source = wf.load_text(calib, default=CALIBRATION_DEFAULT)
    with wf.run.trace("calibration data", samples=samples, seq_len=seq_len, seed=seed):
        batches = calibration_batches(loaded.tokenizer, source, samples, seq_len, seed,
                                      log=wf.progress.log)
    wf.record_dataset(source, int(batches.numel()), role="calibration")
    return batches


def _prune(wf: Workflow, loaded: LoadedModel, config: SparsityConfig,
           calibration: torch.Tensor | None, device: str, batch_size: int) -> CompressionResult:
    from openpto.core.calibrate import decoder_layers
    from openpto.core.sparsity.transforms import sparsify_model as prune_model

    layers = len(decoder_layers(loaded.model)[1])
    wf.progress.log(f"{loaded.name}: {config.type_name} {config.label} "
                    f"(target sparsity {config.target_sparsity:.4g}) on {device}")
    with wf.run.trace("sparsify", device=device) as attrs, \
            wf.progress.task(f"{config.type_name} {config.label}", total=layers) as advance:
        def on_layer(event: LayerEvent) -> None:
            started = datetime.now(timezone.utc) - timedelta(seconds=event.seconds)
            wf.run.trace_row(
                f"layer {event.index}", started.isoformat(timespec="milliseconds"),
                event.seconds * 1000.0,
                {"index": event.index, "peak_memory_bytes": event.peak_memory_bytes,
                 "linears": {r.name.split(".", 3)[-1]: {"error": r.error, **r.extra}
                             for r in event.reports}},
            )
            advance(1)

        compressed = prune_model(loaded.model, config, calibration, on_layer,
                                 device=device, batch_size=batch_size)
        attrs.update(seconds=compressed.seconds, linears=len(compressed.reports))
    return compressed


def _measure(wf: Workflow, loaded: LoadedModel, config: SparsityConfig,
             compressed: CompressionResult) -> SparsitySummary:
    from openpto.core.sparsity import summarize

    params = dict(loaded.model.named_parameters())
    summary = summarize(
        ((r.name, params[f"{r.name}.weight"].detach()) for r in compressed.reports), config.nm
    )
    how = {"method": config.type_name, "pattern": config.label, "measured": "zeros in the weights"}
    wf.run.metric("sparsity", summary.sparsity, "fraction", {
        **how, "target": config.target_sparsity, "params": summary.params,
        "zeros": summary.zeros, "nm_compliant": summary.nm_compliant,
        "layers": {layer.name: round(layer.sparsity, 6) for layer in summary.layers},
    })
    wf.run.metric("params_pruned_layers", summary.params, "params", how)
    wf.run.metric("dense_bytes", summary.dense_bytes, "bytes", {**how, "element_bytes": 2})
    sparse_bytes, layout = _sparse_bytes(summary)
    wf.run.metric("sparse_bytes", sparse_bytes, "bytes", {**how, "layout": layout,
                                                          "element_bytes": 2})
    for name, bound in _bounds(summary, config).items():
        wf.run.metric(f"speedup_bound_{name}", bound, "x", {
            **how, "model": "theoretical", "layout": _layout(config),
            "what": f"{name}-bound upper limit over the pruned Linears (bf16 values)"})
    wf.run.metric("seconds", compressed.seconds, "s", {**how, "device": compressed.device,
                                                        "stage": "calibration and pruning"})
    errors = [r.error for r in compressed.reports]
    if errors:
        wf.run.metric("layer_error_mean", sum(errors) / len(errors), "",
                      {**how, "linears": len(errors), "max": max(errors)})
    return summary


def _layout(config: SparsityConfig) -> str:
    return "2:4" if config.nm == (2, 4) else "unstructured"


def _sparse_bytes(summary: SparsitySummary) -> tuple[int, str]:
    if summary.semi_structured_bytes is not None:
        return summary.semi_structured_bytes, "2:4 values + 2-bit indices"
    return summary.bitmask_bytes, "bitmask: kept values + 1 bit per weight"


def _bounds(summary: SparsitySummary, config: SparsityConfig) -> dict[str, float]:
    """Compute- and memory-bound speed-up limits summed over every pruned Linear (one token for
    the memory bound, where weights dominate; the compute bound holds for any token count)."""
    from openpto.core.sparsity import speedup_bounds

    dense = sparse_flops = sparse_bytes = 0.0
    for layer in summary.layers:
        b = speedup_bounds(layer.out_features, layer.in_features, 1, layout=_layout(config),
                           sparsity=layer.sparsity)
        # Weighted by each layer's size: the model-wide ratio of FLOPs and of bytes.
        dense += layer.params
        sparse_flops += layer.params / b.compute_bound
        sparse_bytes += layer.params / b.memory_bound
    if not dense:
        return {"compute": 1.0, "memory": 1.0}
    return {"compute": dense / sparse_flops, "memory": dense / sparse_bytes}


def _summary_fields(config: SparsityConfig, summary: SparsitySummary) -> dict[str, Any]:
    sparse_bytes, layout = _sparse_bytes(summary)
    return {
        "sparsity": summary.sparsity,
        "target_sparsity": config.target_sparsity,
        "nm_compliant": summary.nm_compliant,
        "params_pruned": summary.params,
        "dense_bytes": summary.dense_bytes,
        "sparse_bytes": sparse_bytes,
        "sparse_layout": layout,
        "speedup_bounds": _bounds(summary, config),
    }


def _perplexity(wf: Workflow, model: Any, ids: torch.Tensor, seq_len: int,
                max_tokens: int | None, stage: str) -> float:
    from openpto.core.metrics import perplexity, plan_windows

    plan = plan_windows(len(ids), seq_len, max_tokens)
    with wf.run.trace(f"eval {stage}", windows=plan.windows, seq_len=seq_len) as attrs, \
            wf.progress.task(f"perplexity {stage}", total=plan.windows) as advance:
        value = perplexity(model, ids, seq_len, max_tokens=max_tokens, progress=advance).perplexity
        attrs["perplexity"] = value
    wf.run.metric(f"perplexity_{stage}", value, "", {
        "seq_len": seq_len, "tokens": plan.tokens, "windows": plan.windows,
        "weights": "float" if stage == "before" else "pruned, in memory (dense kernels)"})
    return value


def _save(wf: Workflow, loaded: LoadedModel, config: SparsityConfig,
          compressed: CompressionResult, summary: SparsitySummary, out: Path,
          result: dict[str, Any], calib: Any, samples: int, seq_len: int, seed: int,
          quantized: dict[str, Any]) -> Any:
    from openpto.pipeline.artifacts import SparseLayout, record_model, write_artifact

    model = loaded.model
    layout = SparseLayout(config.label, tuple(r.name for r in compressed.reports),
                          summary.sparsity)
    metadata = {
        "openpto_version": __version__,
        "source_model": loaded.name,
        "source_kind": loaded.kind,
        "source_sha256": loaded.source_sha256,
        "method": config.type_name,
        "config": config.to_dict(),
        "sparsity": {
            "method": config.type_name, "pattern": config.label,
            "target": config.target_sparsity, "measured": summary.sparsity,
            "nm_compliant": summary.nm_compliant, "params": summary.params,
            "zeros": summary.zeros,
            "layers": {layer.name: round(layer.sparsity, 6) for layer in summary.layers},
        },
        "calibration": None if compressed.method == "magnitude" else {
            "text": None if calib is None else str(getattr(calib, "name", calib)),
            "samples": samples, "seq_len": seq_len, "seed": seed},
        "metrics": {k: result[k] for k in ("perplexity_before", "perplexity_after") if k in result},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    started = time.perf_counter()
    with wf.run.trace("save", output=str(out)) as attrs:
        info = write_artifact(model, loaded.tokenizer, out, quantized, metadata,
                              sparsity=layout)
        attrs.update(format=info.format, size_bytes=info.size_bytes,
                     seconds=time.perf_counter() - started)
    wf.run.metric("size_bytes_after", info.size_bytes, "bytes",
                  {"what": "artifact folder on disk", "format": info.format})
    record_model(wf.store, info, loaded.name, config.type_name, config.to_dict(), wf.run_id)
    wf.progress.log(f"wrote {out} ({info.format}, {info.size_bytes / 2**20:.1f} MiB)")
    return info
