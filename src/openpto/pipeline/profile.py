"""Recorded profiling workflows: ``profile`` (one model) and ``bench`` (several, with a plot).

    from openpto.pipeline.profile import ProfileConfig, profile
    profile("smollm2-135m", ProfileConfig(gen_len=64)).to_dict()["decode_tokens_per_second"]

Both measure with ``openpto.profiling.profile_generation`` on the generation stack
(``core.generate.generate_stream``, batch 1 on the decoder ``opt generate`` uses); its protocol
(random prompt ids, greedy, eos ignored, warm-up, repeats, medians, synchronised timing, peak
memory) is stored in every metric's ``details``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openpto.core.static_decode import DECODE_MODES
from openpto.errors import UsageError
from openpto.pipeline.common import Workflow, open_run
from openpto.profiling import ProfileResult, profile_generation
from openpto.progress import ProgressCallback

if TYPE_CHECKING:
    from openpto.models import LoadedModel
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


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """How generation is profiled (the protocol of ``openpto.profiling``)."""

    type_name = "profile"
    version = 1

    #: prompt tokens per row (random ids)
    prompt_len: int = 128
    #: generated tokens per row (at least 2: the first is the TTFT)
    gen_len: int = 128
    #: rows generated together
    batch: int = 1
    #: timed runs (medians are reported)
    repeats: int = 5
    #: untimed runs first
    warmup: int = 1
    #: add per-module times from torch.profiler (one extra, untimed run)
    modules: bool = False
    #: seed of the random prompt ids
    seed: int = 0
    #: cpu, cuda, cuda:N or mps (a spec string only)
    device: str = "cpu"
    #: float32, bfloat16 or float16 (a spec string only)
    dtype: str = "float32"
    #: batch-1 decoder (core.static_decode): auto, dynamic, static, graph or compiled
    decode: str = "auto"

    def __post_init__(self) -> None:
        for name, least in (("prompt_len", 1), ("gen_len", 2), ("batch", 1), ("repeats", 1),
                            ("warmup", 0)):
            if getattr(self, name) < least:
                raise UsageError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if self.decode not in DECODE_MODES:
            raise UsageError(f"decode must be one of {', '.join(DECODE_MODES)}, "
                             f"got {self.decode!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "version": self.version, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """Several models under one protocol: ``to_dict`` has the ``opt bench --json`` keys."""

    results: list[ProfileResult]
    plot: str | None
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results], "plot": self.plot,
                "run_id": self.run_id}


def _profile_one(wf: Workflow, model: str | LoadedModel | None,
                 config: ProfileConfig) -> ProfileResult:
    if model is None or isinstance(model, str):
        loaded = wf.load_model(model, dtype=config.dtype, device=config.device)
    else:
        loaded = model
        wf.store.update("runs", wf.run.id, {"model": loaded.name})
    options: dict[str, Any] = {
        "prompt_len": config.prompt_len, "gen_len": config.gen_len, "batch": config.batch,
        "repeats": config.repeats, "warmup": config.warmup, "modules": config.modules,
        "seed": config.seed, "decode": config.decode}
    with wf.run.trace("profile", model=loaded.name, **options) as attrs:
        result = profile_generation(loaded.model, **options)
        attrs.update(decode_tokens_per_second=result.decode_tokens_per_second)
    details = {"model": loaded.name, **result.setup, "memory": result.memory,
               "spread": result.spread}
    values = result.to_dict()
    for name, unit in PROFILE_METRICS.items():
        wf.run.metric(name, values[name], unit, details)
    return dataclasses.replace(result, model=loaded.name)


def _model_name(model: str | LoadedModel | None) -> str:
    from openpto.models import DEFAULT_ALIAS

    if model is None:
        return DEFAULT_ALIAS
    return model if isinstance(model, str) else model.name


def profile(
    model: str | LoadedModel | None,
    config: ProfileConfig,
    *,
    progress: ProgressCallback | None = None,
    store: Store | None = None,
) -> ProfileResult:
    """Profile one model (a MODEL spec or a loaded model), recorded as a ``profile`` run; the
    result's ``to_dict`` has the ``opt profile --json`` keys (``model`` and ``run_id`` set)."""
    with open_run("profile", _model_name(model), config.to_dict(), store=store,
                  progress=progress) as wf:
        result = _profile_one(wf, model, config)
        return wf.set_result(dataclasses.replace(result, run_id=wf.run_id))


def bench(
    models: list[str],
    config: ProfileConfig,
    *,
    plot: str | Path | None = None,
    progress: ProgressCallback | None = None,
    store: Store | None = None,
) -> BenchResult:
    """Profile several models in one ``bench`` run (same protocol) and optionally plot them."""
    if not models:
        raise UsageError("opt bench needs at least one MODEL")
    run_config = {**config.to_dict(), "models": list(models),
                  "plot": None if plot is None else str(plot)}
    with open_run("bench", ",".join(models), run_config, store=store, progress=progress) as wf:
        results = []
        with wf.progress.task("bench", total=len(models)) as advance:
            for spec in models:
                results.append(_profile_one(wf, spec, config))
                advance(1)
        wf.store.update("runs", wf.run.id, {"model": ",".join(str(r.model) for r in results)})
        written = None
        if plot is not None:
            from openpto.profiling.plot import plot_bench

            with wf.run.trace("plot", path=str(plot)):
                written = str(plot_bench([r.to_dict() for r in results], Path(plot)))
        return wf.set_result(BenchResult(results, written, wf.run_id))
