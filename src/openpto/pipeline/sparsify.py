"""``sparsify``: load -> calibration data -> prune layer by layer -> measure -> artifact.

One recorded ``sparsify`` run: a trace per stage and per decoder layer (each Linear's error and
measured sparsity, peak memory), metrics measured from the pruned weights (overall and per-layer
sparsity, N:M compliance, parameter and byte counts, the theoretical speed-up bounds), with
evaluation options the perplexity before and after, and a ``models`` row for the artifact.

The artifact stores the pruned Linears in compressed-tensors' ``sparse-bitmask`` layout
(``sparse-24-bitmask`` for 2:4): the kept values and one bit per weight, so the mask is exact and
the folder shrinks. In SparseGPT's joint mode it is a ``pack-quantized`` folder whose pruned
entries hold the zero-point code and dequantize to exactly 0. ``openpto.json`` records the
method, its config, the pattern, the measured sparsity and the ``sparse_format``. With
``options.sparse_format="dense"`` the pruned weights are stored as they are (16-bit by default),
a folder plain transformers and vLLM load; ``options.dry_run`` plans the artifact's size from
the target sparsity and writes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from openpto.errors import UsageError
from openpto.pipeline.common import Workflow, open_run
from openpto.pipeline.workflow import (
    SparsifyOptions,
    WorkflowResult,
    base_metadata,
    calibration,
    calibration_metadata,
    count_layers,
    default_output,
    eval_ids,
    layer_recorder,
    load,
    perplexity,
    run_model_name,
)
from openpto.progress import ProgressCallback

if TYPE_CHECKING:
    import torch

    from openpto.core.calibrate import CompressionResult
    from openpto.core.sparsity import SparsityConfig, SparsitySummary
    from openpto.models import LoadedModel
    from openpto.store import Store


@dataclass
class SparsifyResult(WorkflowResult):
    """What ``sparsify`` did; ``to_dict()`` is ``opt sparsify --json``'s object."""

    optional: ClassVar[tuple[str, ...]] = ("perplexity_before", "perplexity_after", "dry_run")

    output: str
    method: str
    pattern: str
    sparsity: float  # measured from the weights over the pruned Linears
    target_sparsity: float
    nm_compliant: bool | None  # for the requested N:M; None when unstructured
    params_pruned: int
    dense_bytes: int
    sparse_bytes: int
    sparse_layout: str
    speedup_bounds: dict[str, float]
    seconds: float  # calibration and pruning
    size_bytes_after: int  # the folder on disk (with dry_run: the planned size)
    run_id: str
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    dry_run: bool | None = None  # True when nothing was written (sparsity is then the target)


def output_label(config: SparsityConfig) -> str:
    """``wanda-s0.5``, ``sparsegpt-2of4-w4g64``: the method, its shape and any joint grid."""
    shape = config.pattern.replace(":", "of") if config.pattern else f"s{config.sparsity:g}"
    bits = getattr(config, "bits", None)
    grid = ""
    if bits is not None:
        group = getattr(config, "group_size", None)
        grid = f"-w{bits}" + (f"g{group}" if group else "ch")
    return f"{config.type_name}-{shape}{grid}"


def sparsify(
    model: str | LoadedModel | None,
    config: SparsityConfig,
    options: SparsifyOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    store: Store | None = None,
) -> SparsifyResult:
    """Prune ``model`` (a MODEL spec, or a loaded model, which is pruned in place) with
    ``config`` and write an artifact folder; see the module docstring."""
    from openpto.core.sparsity import SparsityConfig
    from openpto.core.sparsity.transforms import check_widths
    from openpto.pipeline.artifacts import check_output

    options = options if options is not None else SparsifyOptions()
    run_config = {"method": config.type_name, "method_config": config.to_dict(),
                  **options.to_dict()}
    with open_run("sparsify", run_model_name(model), run_config, store=store,
                  progress=progress) as wf:
        if not isinstance(config, SparsityConfig):
            raise UsageError(f"{config.type_name} is not a pruning method; use quantize")
        options.check()
        if options.output is not None:
            check_output(Path(options.output))
        loaded = load(wf, model, options)
        out = (Path(options.output) if options.output is not None
               else default_output(loaded.name, output_label(config)))
        check_output(out)
        check_widths(loaded.model, config)
        if options.dry_run:
            return _dry_run(wf, loaded, config, out, options)
        if options.sparse_format == "compressed" and getattr(config, "bits", None) is None:
            wf.progress.warning(
                "the compressed sparse layout is read by opt and compressed-tensors<=0.14; "
                "plain transformers loads its pruned Linears randomly initialised and vLLM "
                "refuses it (--sparse-format dense writes a folder both read as is)",
                category="sparse_format")
        ids = eval_ids(wf, loaded, options.evaluation)
        before = None
        if ids is not None and options.evaluation is not None:
            before = perplexity(wf, loaded.model, ids, options.evaluation, "before", "float")

        batches = calibration(wf, loaded, options.calibration, config.needs_calibration)
        compressed = _prune(wf, loaded, config, batches, options)
        summary = _measure(wf, loaded, config, compressed)
        fields = _summary_fields(config, summary)
        from openpto.pipeline.artifacts import round_to_stored

        # The model computes with exactly what the artifact stores from here on.
        stored = round_to_stored(loaded.model, compressed.quantized_weights(),
                                 options.float_dtype)
        after = None
        if ids is not None and options.evaluation is not None:
            after = perplexity(wf, loaded.model, ids, options.evaluation, "after",
                               "pruned, in memory (dense kernels)")
        metrics = {k: v for k, v in (("perplexity_before", before), ("perplexity_after", after))
                   if v is not None}
        info = _save(wf, loaded, config, compressed, summary, out, metrics, options, stored)
        result = SparsifyResult(
            output=str(out), method=config.type_name, pattern=config.label, **fields,
            seconds=compressed.seconds, size_bytes_after=info.size_bytes, run_id=wf.run_id,
            perplexity_before=before, perplexity_after=after,
        )
        wf.set_result(result.to_dict())
        return result


def _prune(wf: Workflow, loaded: LoadedModel, config: SparsityConfig,
           batches: torch.Tensor | None, options: SparsifyOptions) -> CompressionResult:
    from openpto.core.sparsity.transforms import sparsify_model as prune_model

    device = options.device
    wf.progress.log(f"{loaded.name}: {config.type_name} {config.label} "
                    f"(target sparsity {config.target_sparsity:.4g}) on {device}")
    with wf.run.trace("sparsify", device=device) as attrs, \
            wf.progress.task(f"{config.type_name} {config.label}",
                             total=count_layers(loaded)) as advance:
        compressed = prune_model(loaded.model, config, batches, layer_recorder(wf, advance),
                                 device=device, batch_size=options.batch_size)
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


def _metadata(loaded: LoadedModel, config: SparsityConfig, summary: SparsitySummary,
              options: SparsifyOptions, metrics: dict[str, float]) -> dict[str, Any]:
    """``openpto.json``: what was done and what the weights measure."""
    return {
        **base_metadata(loaded, config),
        "config": config.to_dict(),
        "sparsity": {
            "method": config.type_name, "pattern": config.label,
            "target": config.target_sparsity, "measured": summary.sparsity,
            "nm_compliant": summary.nm_compliant, "params": summary.params,
            "zeros": summary.zeros, "storage": options.sparse_format,
            "layers": {layer.name: round(layer.sparsity, 6) for layer in summary.layers},
        },
        "calibration": calibration_metadata(options.calibration, config.needs_calibration),
        "metrics": metrics,
    }


def _save(wf: Workflow, loaded: LoadedModel, config: SparsityConfig,
          compressed: CompressionResult, summary: SparsitySummary, out: Path,
          metrics: dict[str, float], options: SparsifyOptions,
          quantized: dict[str, Any]) -> Any:
    from openpto.pipeline.artifacts import SparseLayout, record_model, write_artifact

    model = loaded.model
    layout = SparseLayout(config.label, tuple(r.name for r in compressed.reports),
                          summary.sparsity, compress=options.sparse_format == "compressed")
    metadata = _metadata(loaded, config, summary, options, metrics)
    started = time.perf_counter()
    with wf.run.trace("save", output=str(out)) as attrs:
        info = write_artifact(model, loaded.tokenizer, out, quantized, metadata,
                              sparsity=layout, float_dtype=options.float_dtype)
        attrs.update(format=info.format, size_bytes=info.size_bytes,
                     seconds=time.perf_counter() - started)
    wf.run.metric("size_bytes_after", info.size_bytes, "bytes",
                  {"what": "artifact folder on disk", "format": info.format})
    record_model(wf.store, info, loaded.name, config.type_name, config.to_dict(), wf.run_id)
    wf.progress.log(f"wrote {out} ({info.format}, {info.size_bytes / 2**20:.1f} MiB)")
    return info


def _planned_summary(linears: dict[str, Any], config: SparsityConfig) -> SparsitySummary:
    """What pruning to the target will measure, layer by layer, before any pruning."""
    from openpto.core.sparsity.metrics import (
        LayerSparsity,
        SparsitySummary,
        bitmask_bytes,
        semi_structured_bytes,
    )

    target = config.target_sparsity
    layers = [LayerSparsity(name, linear.out_features, linear.in_features,
                            round(linear.out_features * linear.in_features * target), target,
                            None, config.nm == (2, 4))
              for name, linear in linears.items()]
    params = sum(layer.params for layer in layers)
    zeros = sum(layer.zeros for layer in layers)
    return SparsitySummary(
        layers=layers, params=params, zeros=zeros, sparsity=zeros / params if params else 0.0,
        nm_compliant=None, dense_bytes=params * 2,
        semi_structured_bytes=(sum(semi_structured_bytes(layer.params) for layer in layers)
                               if config.nm == (2, 4) else None),
        bitmask_bytes=sum(bitmask_bytes(layer.params, layer.params - layer.zeros)
                          for layer in layers),
    )


def _dry_run(wf: Workflow, loaded: LoadedModel, config: SparsityConfig, out: Path,
             options: SparsifyOptions) -> SparsifyResult:
    """The artifact's planned size at the target sparsity; nothing is pruned or written."""
    from openpto.pipeline.artifacts import SparseLayout, WeightPlan, planned_size, scale_dtype_for
    from openpto.pipeline.backends.torch_backend import decoder_linears

    linears = decoder_linears(loaded.model)
    bits = getattr(config, "bits", None)
    plans = {}
    if bits is not None:  # SparseGPT's joint mode: the pruned Linears are quantized too
        group = getattr(config, "group_size", None)
        plans = {name: WeightPlan(linear.out_features, linear.in_features, int(bits),
                                  int(group or linear.in_features),
                                  bool(getattr(config, "symmetric", False)))
                 for name, linear in linears.items()}
    layout = SparseLayout(config.label, tuple(linears), config.target_sparsity,
                          compress=options.sparse_format == "compressed")
    summary = _planned_summary(linears, config)
    # The same openpto.json as a real run, with the planned sparsity in place of the measured.
    metadata = _metadata(loaded, config, summary, options, {})
    planned = planned_size(loaded.model, loaded.tokenizer, plans, scale_dtype_for(loaded.dtype),
                           metadata, float_dtype=options.float_dtype, sparsity=layout)
    wf.run.metric("size_bytes_planned", planned, "bytes", {
        "dry_run": True, "format": layout.format_for(plans),
        "sparsity": "the target, over the Linears to prune"})
    wf.progress.log(f"dry run: {out} would be {layout.format_for(plans)}, "
                    f"{planned / 2**20:.1f} MiB; nothing written")
    result = SparsifyResult(
        output=str(out), method=config.type_name, pattern=config.label,
        **_summary_fields(config, summary), seconds=0.0, size_bytes_after=planned,
        run_id=wf.run_id, dry_run=True,
    )
    wf.set_result(result.to_dict())
    return result
