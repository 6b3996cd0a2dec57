"""``quantize``: load -> calibration data -> quantize layer by layer -> artifact -> eval.

The caller builds the method config (``GPTQConfig(bits=4, group_size=64)``, any registered
quantization config) and the workflow options; the backend named in the options receives that
config. Everything is one recorded ``quantize`` run: a ``traces`` row per stage and per decoder
layer (its error, seconds and peak memory), metrics for the sizes, the time, the layer errors
and, with evaluation options, the perplexity before and after, and a ``models`` row for the
artifact. Options are checked and the output folder proven writable before any calibration work,
and the artifact is written atomically, so a failed run leaves a ``failed`` row and no folder
that looks complete.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from openpto.errors import ConfigError, UsageError
from openpto.pipeline.artifacts import check_output, record_model
from openpto.pipeline.backends import get_backend
from openpto.pipeline.backends.base import QuantizeJob, describe
from openpto.pipeline.common import Workflow, open_run
from openpto.pipeline.workflow import (
    QuantizeOptions,
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
    from openpto.core.quant import QuantConfig
    from openpto.models import LoadedModel
    from openpto.store import Store

#: group sizes tried, largest first, when none is given for a sub-8-bit grid
AUTO_GROUP_SIZES = (128, 64, 32)
AUTO = "auto"


@dataclass
class QuantizeResult(WorkflowResult):
    """What ``quantize`` did; ``to_dict()`` is ``opt quantize --json``'s object."""

    optional: ClassVar[tuple[str, ...]] = ("perplexity_before", "perplexity_after", "dry_run")

    output: str
    method: str
    bits: int
    group_size: int | None
    symmetric: bool
    backend: str
    format: str
    size_bytes_before: int
    size_bytes_after: int  # the folder on disk (with dry_run: the planned size)
    seconds: float  # calibration and quantization, not loading, saving or evaluation
    run_id: str
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    dry_run: bool | None = None  # True when nothing was written


def resolve_group_size(
    group_size: int | str | None, bits: int, widths: set[int]
) -> tuple[int | None, str | None]:
    """The group size to use and, when it was chosen automatically, a note saying why.

    ``"auto"``: per-channel for 8 bits (near-lossless already), else the largest of 128/64/32
    dividing every Linear's input width. An explicit size that does not divide a width is refused
    with the sizes that do.
    """
    if group_size == AUTO:
        if bits >= 8:
            return None, None
        for g in AUTO_GROUP_SIZES:
            if all(w % g == 0 for w in widths):
                skipped = [s for s in AUTO_GROUP_SIZES if s > g]
                why = (f" ({', '.join(map(str, skipped))} does not divide every input width "
                       f"{sorted(widths)})") if skipped else ""
                return g, f"group size {g}{why}"
        return None, f"per-channel scales (none of 128/64/32 divides the widths {sorted(widths)})"
    if group_size is None:
        return None, None
    if not isinstance(group_size, int) or group_size <= 0:
        raise UsageError(
            f"--group-size must be a positive integer or 'channel', not {group_size!r}"
        )
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
        sizes = ", ".join(map(str, fits)) if fits else "none of 32, 64, 128"
        raise ConfigError(
            f"group size {group_size} does not divide the input width(s) "
            f"{', '.join(map(str, bad))} of this model; group sizes that divide every width: "
            f"{sizes} (or 'channel')"
        )
    return group_size, None


def output_label(config: QuantConfig, backend: str) -> str:
    """``gptq-w4g64``, ``rtn-w8ch``, with ``-sym``/``-asym`` where not the backend's default and
    ``-<backend>`` for other backends than torch."""
    grid = f"w{config.bits}" + (f"g{config.group_size}" if config.group_size else "ch")
    default_sym = get_backend(backend).default_symmetric(config.bits)
    sym = "" if config.symmetric == default_sym else ("-sym" if config.symmetric else "-asym")
    suffix = "" if backend == "torch" else f"-{backend}"
    return f"{config.type_name}-{grid}{sym}{suffix}"


def quantize(
    model: str | LoadedModel | None,
    config: QuantConfig,
    options: QuantizeOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    store: Store | None = None,
) -> QuantizeResult:
    """Quantize ``model`` (a MODEL spec, or a loaded model, which is quantized in place) with
    ``config`` and write an artifact folder; see the module docstring.

    ``config.group_size="auto"`` is resolved against the model's widths once it is loaded; the
    backend may fix the grid its format has (bitsandbytes, quanto). With ``options.dry_run``
    nothing is written and ``size_bytes_after`` is the planned size.
    """
    options = options if options is not None else QuantizeOptions()
    run_config = {"method": config.type_name, "method_config": config.to_dict(),
                  **options.to_dict()}
    with open_run("quantize", run_model_name(model), run_config, store=store,
                  progress=progress) as wf:
        options.check()
        engine = get_backend(options.backend)
        # Method and bits first: a backend that lacks them fails before the model loads.
        engine.check(config)
        if options.output is not None:
            check_output(Path(options.output))
        loaded = load(wf, model, options)
        resolved = _resolve(wf, loaded, engine, config)
        wf.run.set_config({"resolved": describe(resolved, options.device)})
        out = (Path(options.output) if options.output is not None
               else default_output(loaded.name, output_label(resolved, options.backend)))
        check_output(out)
        needs_data = engine.needs_calibration(resolved)
        metadata = {
            **base_metadata(loaded, resolved), "backend": options.backend,
            "quantization": describe(resolved, options.device),
            "calibration": calibration_metadata(options.calibration, needs_data),
        }
        with wf.run.trace("plan") as attrs:
            planned = engine.planned_size(loaded, resolved, metadata,
                                          float_dtype=options.float_dtype)
            attrs["size_bytes"] = planned
        group = resolved.group_size
        wf.progress.log(
            f"{loaded.name}: {resolved.type_name} w{resolved.bits} "
            f"{'g' + str(group) if group else 'per-channel'} "
            f"{'sym' if resolved.symmetric else 'asym'} -> {out} "
            f"(about {planned / 2**20:.1f} MiB)"
        )
        result = QuantizeResult(
            output=str(out), method=resolved.type_name, bits=resolved.bits,
            group_size=group if isinstance(group, int) else None,
            symmetric=resolved.symmetric, backend=options.backend, format=engine.format,
            size_bytes_before=loaded.weight_bytes, size_bytes_after=planned, seconds=0.0,
            run_id=wf.run_id,
        )
        if options.dry_run:
            wf.run.metric("size_bytes_planned", planned, "bytes", {"dry_run": True})
            result.dry_run = True
            wf.set_result(result.to_dict())
            return result

        batches = calibration(wf, loaded, options.calibration, needs_data)
        ids = eval_ids(wf, loaded, options.evaluation)
        if ids is not None and options.evaluation is not None:
            result.perplexity_before = perplexity(wf, loaded.model, ids, options.evaluation,
                                                  "before", "float")

        label = f"{resolved.type_name} w{resolved.bits}"
        with wf.run.trace("quantize", backend=options.backend) as attrs, \
                wf.progress.task(f"quantize ({label})", total=count_layers(loaded)) as advance:
            produced = engine.quantize(QuantizeJob(
                loaded, resolved, batches, out, metadata, layer_recorder(wf, advance),
                device=options.device, float_dtype=options.float_dtype))
            attrs.update(seconds=produced.seconds, **produced.details)
        from openpto.pipeline.artifacts import ArtifactInfo, folder_size

        result.format, result.seconds = produced.format, produced.seconds
        result.size_bytes_after = folder_size(out)
        if ids is not None and options.evaluation is not None:
            weights = ("artifact weights, dequantized-reference" if produced.model is not None
                       else f"{options.backend} runtime")
            result.perplexity_after = perplexity(wf, produced.model, ids, options.evaluation,
                                                 "after", weights, score=produced.score)
        _record_metrics(wf, result, produced, planned, options.device)
        record_model(wf.store, ArtifactInfo(out, produced.format, result.size_bytes_after, 0),
                     loaded.name, resolved.type_name,
                     {**describe(resolved, options.device), "backend": options.backend},
                     wf.run_id)
        wf.set_result(result.to_dict())
        return result


def _resolve(wf: Workflow, loaded: LoadedModel, engine: Any, config: QuantConfig) -> QuantConfig:
    """The config with its group size resolved against the model's widths and the grid its
    backend's format fixes; checked against the model."""
    from openpto.pipeline.backends.torch_backend import decoder_linears

    widths = {linear.in_features for linear in decoder_linears(loaded.model).values()}
    # A backend without per-channel scales gets groups at 8 bits too.
    grid_bits = config.bits if engine.per_channel else min(config.bits, 4)
    group, note = resolve_group_size(config.group_size, grid_bits, widths)
    if note:
        wf.progress.log(f"using {note}")
    resolved = dataclasses.replace(config, group_size=group)
    resolved = engine.configure(resolved)
    engine.check_model(loaded, resolved)
    return resolved


def _record_metrics(wf: Workflow, result: QuantizeResult, produced: Any, planned: int,
                    device: str) -> None:
    from openpto.pipeline.workflow import rss_peak_bytes

    how = {"backend": result.backend, "format": result.format, "bits": result.bits,
           "group_size": result.group_size, "symmetric": result.symmetric}
    wf.run.metric("size_bytes_before", result.size_bytes_before, "bytes",
                  {"what": "float weights resident, each shared tensor once"})
    wf.run.metric("size_bytes_after", result.size_bytes_after, "bytes",
                  {**how, "what": "artifact folder on disk"})
    wf.run.metric("size_bytes_planned", planned, "bytes", {"dry_run": False})
    wf.run.metric("seconds", result.seconds, "s", {**how, "device": device,
                                                   "stage": "calibration and quantization"})
    errors = produced.layer_errors
    if errors:
        wf.run.metric("layer_error_mean", sum(errors) / len(errors), "",
                      {**how, "linears": len(errors), "max": max(errors), "min": min(errors)})
    wf.run.metric("peak_rss_bytes", rss_peak_bytes(), "bytes", {"what": "process peak RSS"})
