"""``quantize_model``: load -> calibration data -> quantize layer by layer -> artifact -> eval.

Everything is one recorded ``quantize`` run: a ``traces`` row per stage and per decoder layer
(its error, seconds and peak memory), metrics for the sizes, the time, the layer errors and, with
``eval_text``, the perplexity before and after, and a ``models`` row for the artifact. Options
are checked and the output folder proven writable before any calibration work, and the artifact
is written atomically, so a failed run leaves a ``failed`` row and no folder that looks complete.
"""

from __future__ import annotations

import re
import resource
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openpto import __version__
from openpto.data import CALIBRATION_DEFAULT, EVALUATION_DEFAULT, TextSource
from openpto.errors import ConfigError, UsageError
from openpto.pipeline.artifacts import check_output, record_model
from openpto.pipeline.backends import get_backend
from openpto.pipeline.backends.base import QuantRequest
from openpto.pipeline.common import Workflow, open_run
from openpto.progress import ProgressCallback

if TYPE_CHECKING:
    import torch

    from openpto.core.calibrate import LayerEvent
    from openpto.models import LoadedModel
    from openpto.store import Store

#: group sizes tried, largest first, when none is given for a sub-8-bit grid
AUTO_GROUP_SIZES = (128, 64, 32)
AUTO = "auto"


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


def default_output(model_name: str, request: QuantRequest, backend: str) -> Path:
    from openpto.store import opt_home

    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_name).name or model_name).strip("-")
    grid = f"w{request.bits}" + (f"g{request.group_size}" if request.group_size else "ch")
    default_sym = get_backend(backend).default_symmetric(request.bits)
    sym = "" if request.symmetric == default_sym else ("-sym" if request.symmetric else "-asym")
    suffix = "" if backend == "torch" else f"-{backend}"
    return opt_home() / "artifacts" / f"{stem}-{request.method}-{grid}{sym}{suffix}"


def _rss_peak_bytes() -> int:
    # ru_maxrss is in KiB on Linux: the process's peak resident set so far.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _layer_recorder(wf: Workflow, advance: Any) -> Any:
    def on_layer(event: LayerEvent) -> None:
        started = datetime.now(timezone.utc) - timedelta(seconds=event.seconds)
        short = {r.name: r.name.rsplit(".", 2)[-2] + "." + r.name.rsplit(".", 1)[-1]
                 for r in event.reports}
        errors = {short[r.name]: r.error for r in event.reports}
        values = list(errors.values())
        wf.run.trace_row(
            f"layer {event.index}",
            started.isoformat(timespec="milliseconds"),
            event.seconds * 1000.0,
            {
                "index": event.index, "errors": errors,
                "mean_error": sum(values) / len(values) if values else None,
                "max_error": max(values) if values else None,
                "peak_memory_bytes": event.peak_memory_bytes,
                "peak_rss_bytes": _rss_peak_bytes(),
                # Wall and CPU seconds per phase (forward, hessian, solve, pack) where measured.
                "phases": event.phases, "phases_cpu": event.phases_cpu,
                # What each method reports per Linear (GPTQ: dampening, refit, Hessian products).
                "linears": {short[r.name]: r.extra for r in event.reports if r.extra},
            },
        )
        wf.progress.layer_done(index=event.index, total=event.total, seconds=event.seconds,
                               name=_layer_name(event), errors=errors)
        advance(1)

    return on_layer


def _layer_name(event: LayerEvent) -> str:
    """The decoder layer's module name (``model.layers.3``), from its Linears' names."""
    names = [r.name.rsplit(".", 2)[0] for r in event.reports]
    return names[0] if names else f"layer {event.index}"


def _perplexity(wf: Workflow, model: Any, score: Any, ids: torch.Tensor, seq_len: int,
                max_tokens: int | None, stage: str, weights: str) -> float:
    from openpto.core.metrics import perplexity, plan_windows

    plan = plan_windows(len(ids), seq_len, max_tokens)
    with wf.run.trace(f"eval {stage}", windows=plan.windows, seq_len=seq_len) as attrs, \
            wf.progress.task(f"perplexity {stage}", total=plan.windows) as advance:
        if model is not None:
            scored = perplexity(model, ids, seq_len, max_tokens=max_tokens, progress=advance)
            value = scored.perplexity
        else:
            value = float(score(ids[: plan.tokens], seq_len))
        attrs["perplexity"] = value
    wf.run.metric(f"perplexity_{stage}", value, "", {
        "seq_len": seq_len, "tokens": plan.tokens, "windows": plan.windows, "weights": weights,
    })
    return value


def quantize_model(
    model_spec: str | None = None,
    method: str = "gptq",
    bits: int = 4,
    group_size: int | str | None = AUTO,
    symmetric: bool | None = None,
    calib: str | TextSource | None = None,
    samples: int = 128,
    calib_seq_len: int = 512,
    output: str | Path | None = None,
    device: str = "cpu",
    backend: str = "torch",
    dry_run: bool = False,
    eval_text: str | TextSource | None = None,
    eval_seq_len: int = 512,
    eval_max_tokens: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    progress: ProgressCallback | None = None,
    store: Store | None = None,
    float_targets: bool | None = None,
) -> dict[str, Any]:
    """Quantize ``model_spec`` and write an artifact folder; see the module docstring.

    ``group_size``: an int, ``None`` for per-channel, or ``"auto"``; ``symmetric=None`` means
    symmetric for 8 bits and asymmetric below. Returns ``output``, ``method``, ``bits``,
    ``group_size``, ``symmetric``, ``backend``, ``format``, ``size_bytes_before``,
    ``size_bytes_after``, ``seconds``, ``run_id`` (and ``perplexity_before``/``_after`` with
    ``eval_text``); with ``dry_run`` nothing is written and ``size_bytes_after`` is the estimate.
    ``float_targets`` (GPTQ, torch backend): fit to the float model's outputs or not; None keeps
    ``GPTQConfig``'s default (on).
    """
    config = {"method": method, "bits": bits, "group_size": group_size, "symmetric": symmetric,
              "samples": samples, "calib_seq_len": calib_seq_len, "device": device,
              "backend": backend, "dry_run": dry_run, "seed": seed, "dtype": dtype,
              "float_targets": float_targets,
              "output": None if output is None else str(output)}
    with open_run("quantize", model_spec, config, store=store, progress=progress) as wf:
        if samples < 1 or calib_seq_len < 2:
            raise UsageError("--samples must be at least 1 and --calib-seq-len at least 2")
        engine = get_backend(backend)
        # Method and bits first: a backend that lacks them fails before the model loads.
        engine.check(QuantRequest(method, bits, None, engine.default_symmetric(bits), device,
                                  float_targets=float_targets))
        if output is not None:
            check_output(Path(output))
        loaded = wf.load_model(model_spec, dtype=dtype, device="cpu")
        request = _resolve_request(wf, loaded, engine, method, bits, group_size, symmetric, device,
                                   float_targets)
        wf.run.set_config({"resolved": request.describe()})
        out = Path(output) if output is not None else default_output(loaded.name, request, backend)
        check_output(out)
        metadata = _metadata(loaded, request, backend, calib, samples, calib_seq_len, seed)
        with wf.run.trace("plan") as attrs:
            planned = engine.planned_size(loaded, request, metadata)
            attrs["size_bytes"] = planned
        size_before = loaded.weight_bytes
        wf.progress.log(
            f"{loaded.name}: {request.method} w{request.bits} "
            f"{'g' + str(request.group_size) if request.group_size else 'per-channel'} "
            f"{'sym' if request.symmetric else 'asym'} -> {out} (about {planned / 2**20:.1f} MiB)"
        )
        result: dict[str, Any] = {
            "output": str(out), "method": request.method, "bits": request.bits,
            "group_size": request.group_size, "symmetric": request.symmetric,
            "backend": backend, "format": engine.format,
            "size_bytes_before": size_before, "size_bytes_after": planned,
            "seconds": 0.0, "run_id": wf.run_id,
        }
        if dry_run:
            wf.run.metric("size_bytes_planned", planned, "bytes", {"dry_run": True})
            return wf.set_result({**result, "dry_run": True})

        calibration = _calibration(wf, loaded, engine, request, calib, samples, calib_seq_len, seed)
        eval_ids = None
        if eval_text is not None:
            source = wf.load_text(eval_text, default=EVALUATION_DEFAULT)
            eval_ids = wf.tokenize(loaded.tokenizer, source, role="eval")
            result["perplexity_before"] = _perplexity(
                wf, loaded.model, None, eval_ids, eval_seq_len, eval_max_tokens, "before", "float")

        layers = _count_layers(loaded)
        label = f"{request.method} w{request.bits}"
        with wf.run.trace("quantize", backend=backend) as attrs, \
                wf.progress.task(f"quantize ({label})", total=layers) as advance:
            produced = engine.quantize(loaded, request, calibration, out, metadata,
                                       _layer_recorder(wf, advance))
            attrs.update(seconds=produced.seconds, **produced.details)
        from openpto.pipeline.artifacts import folder_size

        size_after = folder_size(out)
        result.update(format=produced.format, size_bytes_after=size_after, seconds=produced.seconds)
        if eval_ids is not None:
            weights = "artifact weights, dequantized-reference" if produced.model is not None \
                else f"{backend} runtime"
            result["perplexity_after"] = _perplexity(
                wf, produced.model, produced.score, eval_ids, eval_seq_len, eval_max_tokens,
                "after", weights)
        _record_metrics(wf, result, produced, planned, request)
        info_config = {**request.describe(), "backend": backend}
        from openpto.pipeline.artifacts import ArtifactInfo

        record_model(wf.store, ArtifactInfo(out, produced.format, size_after, 0), loaded.name,
                     request.method, info_config, wf.run_id)
        return wf.set_result(result)


def _resolve_request(wf: Workflow, loaded: LoadedModel, engine: Any, method: str, bits: int,
                     group_size: int | str | None, symmetric: bool | None, device: str,
                     float_targets: bool | None = None) -> QuantRequest:
    from openpto.pipeline.backends.torch_backend import decoder_linears

    widths = {linear.in_features for linear in decoder_linears(loaded.model).values()}
    # A backend without per-channel scales gets groups at 8 bits too.
    grid_bits = bits if engine.per_channel else min(bits, 4)
    group, note = resolve_group_size(group_size, grid_bits, widths)
    if note:
        wf.progress.log(f"using {note}")
    sym = engine.default_symmetric(bits) if symmetric is None else symmetric
    request = QuantRequest(method, bits, group, sym, device, float_targets=float_targets)
    engine.check(request)
    request = engine.configure(request)
    engine.check_model(loaded, request)
    return request


def _metadata(loaded: LoadedModel, request: QuantRequest, backend: str, calib: Any,
              samples: int, calib_seq_len: int, seed: int) -> dict[str, Any]:
    return {
        "openpto_version": __version__,
        "source_model": loaded.name,
        "source_kind": loaded.kind,
        "source_path": str(loaded.path),
        "source_sha256": loaded.source_sha256,
        "backend": backend,
        "quantization": request.describe(),
        "calibration": {"text": None if calib is None else str(getattr(calib, "name", calib)),
                        "samples": samples, "seq_len": calib_seq_len, "seed": seed},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _calibration(wf: Workflow, loaded: LoadedModel, engine: Any, request: QuantRequest,
                 calib: Any, samples: int, seq_len: int, seed: int) -> torch.Tensor | None:
    if not engine.needs_calibration(request):
        return None
    from openpto.data import calibration_batches

    source = wf.load_text(calib, default=CALIBRATION_DEFAULT)
    with wf.run.trace("calibration data", samples=samples, seq_len=seq_len, seed=seed):
        batches = calibration_batches(loaded.tokenizer, source, samples, seq_len, seed,
                                      log=wf.progress.log)
    wf.record_dataset(source, int(batches.numel()), role="calibration")
    return batches


def _count_layers(loaded: LoadedModel) -> int:
    from openpto.core.calibrate import decoder_layers

    return len(decoder_layers(loaded.model)[1])


def _record_metrics(wf: Workflow, result: dict[str, Any], produced: Any, planned: int,
                    request: QuantRequest) -> None:
    how = {"backend": result["backend"], "format": result["format"], "bits": request.bits,
           "group_size": request.group_size, "symmetric": request.symmetric}
    wf.run.metric("size_bytes_before", result["size_bytes_before"], "bytes",
                  {"what": "float weights resident, each shared tensor once"})
    wf.run.metric("size_bytes_after", result["size_bytes_after"], "bytes",
                  {**how, "what": "artifact folder on disk"})
    wf.run.metric("size_bytes_planned", planned, "bytes", {"dry_run": False})
    wf.run.metric("seconds", result["seconds"], "s", {**how, "device": request.device,
                                                      "stage": "calibration and quantization"})
    errors = produced.layer_errors
    if errors:
        wf.run.metric("layer_error_mean", sum(errors) / len(errors), "",
                      {**how, "linears": len(errors), "max": max(errors), "min": min(errors)})
    wf.run.metric("peak_rss_bytes", _rss_peak_bytes(), "bytes", {"what": "process peak RSS"})
