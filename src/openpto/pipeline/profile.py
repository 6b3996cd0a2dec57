"""Recorded profiling workflows: ``profile`` (one model) and ``bench`` (several, with a plot).

Both use ``openpto.profiling.profile_generation``; its protocol (random prompt ids, greedy,
eos ignored, warm-up, repeats, medians, synchronised timing, peak memory) is stored in every
metric's ``details``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from openpto.errors import UsageError
from openpto.pipeline.common import Workflow, open_run
from openpto.profiling import profile_generation
from openpto.progress import ProgressCallback

if TYPE_CHECKING:
    from openpto.store import Store

#: metric name -> unit, recorded for every profiled model
PROFILE_METRICS = {
    "ttft_ms": "ms",
    "tpot_ms": "ms",
    "prefill_tokens_per_second": "tokens/s",
    "decode_tokens_per_second": "tokens/s",
    "itl_p50_ms": "ms",
    "itl_p90_ms": "ms",
    "itl_p99_ms": "ms",
    "peak_memory_bytes": "bytes",
}


def _profile_one(
    wf: Workflow,
    spec: str | None,
    options: dict[str, Any],
    device: str,
    dtype: str,
) -> dict[str, Any]:
    loaded = wf.load_model(spec, dtype=dtype, device=device)
    with wf.run.trace("profile", model=loaded.name, **options) as attrs:
        result = profile_generation(loaded.model, **options).to_dict()
        attrs.update(decode_tokens_per_second=result["decode_tokens_per_second"])
    details = {"model": loaded.name, **result["setup"], "memory": result["memory"],
               "spread": result["spread"]}
    for name, unit in PROFILE_METRICS.items():
        wf.run.metric(name, result[name], unit, details)
    return {"model": loaded.name, **result}


def _options(prompt_len: int, gen_len: int, batch: int, repeats: int, warmup: int,
             modules: bool = False) -> dict[str, Any]:
    return {"prompt_len": prompt_len, "gen_len": gen_len, "batch": batch, "repeats": repeats,
            "warmup": warmup, "modules": modules}


def profile(
    model_spec: str | None = None,
    *,
    prompt_len: int = 128,
    gen_len: int = 128,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    modules: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    progress: ProgressCallback | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Profile one model; returns the ``ProfileResult`` keys plus ``model`` and ``run_id``."""
    from openpto.models import DEFAULT_ALIAS

    options = _options(prompt_len, gen_len, batch, repeats, warmup, modules)
    config = {**options, "device": device, "dtype": dtype}
    with open_run("profile", model_spec or DEFAULT_ALIAS, config, store=store,
                  progress=progress) as wf:
        result = _profile_one(wf, model_spec, options, device, dtype)
        return {**result, "run_id": wf.run_id}


def bench(
    model_specs: list[str],
    *,
    prompt_len: int = 128,
    gen_len: int = 128,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    plot: str | Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: ProgressCallback | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Profile several models in one ``bench`` run (same protocol) and optionally plot them.

    Returns ``results`` (one ``profile`` dict per model, in order), ``plot`` (the PNG path or
    None) and ``run_id``.
    """
    if not model_specs:
        raise UsageError("opt bench needs at least one MODEL")
    options = _options(prompt_len, gen_len, batch, repeats, warmup)
    config = {**options, "models": list(model_specs), "device": device, "dtype": dtype,
              "plot": None if plot is None else str(plot)}
    with open_run("bench", ",".join(model_specs), config, store=store, progress=progress) as wf:
        results = []
        with wf.progress.task("bench", total=len(model_specs)) as advance:
            for spec in model_specs:
                results.append(_profile_one(wf, spec, options, device, dtype))
                advance(1)
        wf.store.update("runs", wf.run.id, {"model": ",".join(r["model"] for r in results)})
        written = None
        if plot is not None:
            from openpto.profiling.plot import plot_bench

            with wf.run.trace("plot", path=str(plot)):
                written = str(plot_bench(results, Path(plot)))
        return {"results": results, "plot": written, "run_id": wf.run_id}
