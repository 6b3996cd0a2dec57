"""The shape quantize and sparsify share: options, calibration data, perplexity before and after,
the default output path, the per-layer recorder, and the result dataclasses.

Both workflows run ``load -> (eval before) -> calibrate -> compress layer by layer -> write the
artifact -> (eval after) -> record``; what differs is the method config and who writes the
artifact (a quantization backend, or the sparsify workflow itself).
"""

from __future__ import annotations

import dataclasses
import re
import resource
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from openpto.data import CALIBRATION_DEFAULT, EVALUATION_DEFAULT, TextSource
from openpto.errors import UsageError
from openpto.progress import Advance

if TYPE_CHECKING:
    import torch

    from openpto.config import MethodConfig
    from openpto.core.calibrate import LayerEvent
    from openpto.models import LoadedModel
    from openpto.pipeline.common import Workflow

#: how tensors that are not quantized are stored in an artifact ("keep": the model's own dtype)
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "keep")


@dataclass(frozen=True)
class CalibrationOptions:
    """The calibration data: ``samples`` windows of ``seq_len`` tokens drawn from ``text``."""

    text: str | TextSource | None = None  # None: the default calibration text (pydoc-topics)
    samples: int = 128
    seq_len: int = 512
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"text": _text_name(self.text), "samples": self.samples,
                "seq_len": self.seq_len, "seed": self.seed}


@dataclass(frozen=True)
class EvalOptions:
    """Perplexity before and after, on ``text`` in windows of ``seq_len`` tokens."""

    text: str | TextSource | None = None  # None: the default evaluation text
    seq_len: int = 512
    max_tokens: int | None = None  # score at most this many tokens (None: the whole text)

    def to_dict(self) -> dict[str, Any]:
        return {"text": _text_name(self.text), "seq_len": self.seq_len,
                "max_tokens": self.max_tokens}


SPARSE_FORMATS = ("compressed", "dense")


@dataclass(frozen=True)
class WorkflowOptions:
    """What quantize and sparsify both take besides the method config."""

    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    evaluation: EvalOptions | None = None  # None: no perplexity before and after
    output: str | Path | None = None  # None: a folder under OPT_HOME/artifacts named for the run
    device: str = "cpu"  # where each layer is calibrated and compressed
    dtype: str = "float32"  # the dtype the model is loaded in
    float_dtype: str = "bfloat16"  # storage of tensors that are not quantized (FLOAT_DTYPES)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, Path):
                value = str(value)
            data[f.name] = value
        return data

    def check(self) -> None:
        """Refuse bad options before anything slow happens."""
        calib = self.calibration
        if calib.samples < 1 or calib.seq_len < 2:
            raise UsageError("--samples must be at least 1 and --calib-seq-len at least 2")
        if self.evaluation is not None:
            if self.evaluation.seq_len < 2:
                raise UsageError("the evaluation --seq-len must be at least 2")
            if self.evaluation.max_tokens is not None and self.evaluation.max_tokens < 1:
                raise UsageError("the evaluation --max-tokens must be positive")
        if self.float_dtype not in FLOAT_DTYPES:
            raise UsageError(f"float_dtype must be one of {', '.join(FLOAT_DTYPES)}, "
                             f"not {self.float_dtype!r}")


@dataclass(frozen=True)
class QuantizeOptions(WorkflowOptions):
    backend: str = "torch"  # a registered quantization backend (see opt info)
    dry_run: bool = False  # plan the artifact (its size) and write nothing


@dataclass(frozen=True)
class SparsifyOptions(WorkflowOptions):
    batch_size: int = 8  # calibration windows per forward pass
    # compressed: a compressed-tensors bitmask layout (smaller on disk); dense: the pruned
    # weights stored as they are, a folder any transformers or vLLM loads
    sparse_format: str = "compressed"
    dry_run: bool = False  # plan the artifact (its size) and write nothing

    def check(self) -> None:
        super().check()
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.sparse_format not in SPARSE_FORMATS:
            raise UsageError(f"sparse_format must be one of {', '.join(SPARSE_FORMATS)}, "
                             f"not {self.sparse_format!r}")


def _text_name(text: str | TextSource | None) -> str | None:
    return None if text is None else str(getattr(text, "name", text))


@dataclass
class WorkflowResult:
    """A workflow's result; ``to_dict()`` is what ``opt ... --json`` prints. Fields named in
    ``optional`` are left out of the dict while they are None (as when ``--eval`` was not
    given)."""

    optional: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.name in self.optional and getattr(self, f.name) is None)}


# ---------------------------------------------------------------------------------------------
# The shared stages


def run_model_name(model: str | LoadedModel | None) -> str | None:
    """What the run row names before the load (a failed load still says which model)."""
    if model is None or isinstance(model, str):
        return model
    return model.name


def load(wf: Workflow, model: str | LoadedModel | None, options: WorkflowOptions) -> LoadedModel:
    """The model to compress: loaded from its spec on the CPU (layers move to ``device`` one at a
    time), or the caller's loaded model, which is then compressed in place."""
    from openpto.models import LoadedModel

    if isinstance(model, LoadedModel):
        with wf.run.trace("load", spec=model.name, given=True) as attrs:
            attrs.update(name=model.name, kind=model.kind, path=str(model.path),
                         source_sha256=model.source_sha256)
        wf.store.update("runs", wf.run_id, {"model": model.name})
        return model
    return wf.load_model(model, dtype=options.dtype, device="cpu")


def default_output(model_name: str, label: str) -> Path:
    """``OPT_HOME/artifacts/<model>-<label>``, the model's name made safe for a folder."""
    from openpto.store import opt_home

    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model_name).name or model_name).strip("-")
    return opt_home() / "artifacts" / f"{stem}-{label}"


def calibration(wf: Workflow, loaded: LoadedModel, options: CalibrationOptions,
                needed: bool) -> torch.Tensor | None:
    """``[samples, seq_len]`` token ids of the calibration text, recorded as a data set (None
    when the method reads no data)."""
    if not needed:
        return None
    from openpto.data import calibration_batches

    source = wf.load_text(options.text, default=CALIBRATION_DEFAULT)
    with wf.run.trace("calibration data", samples=options.samples, seq_len=options.seq_len,
                      seed=options.seed):
        batches = calibration_batches(loaded.tokenizer, source, options.samples, options.seq_len,
                                      options.seed, log=wf.progress.log)
    wf.record_dataset(source, int(batches.numel()), role="calibration")
    return batches


def calibration_metadata(options: CalibrationOptions, used: bool) -> dict[str, Any] | None:
    """The ``calibration`` entry of ``openpto.json`` (None for a data-free method)."""
    return options.to_dict() if used else None


def eval_ids(wf: Workflow, loaded: LoadedModel,
             options: EvalOptions | None) -> torch.Tensor | None:
    if options is None:
        return None
    source = wf.load_text(options.text, default=EVALUATION_DEFAULT)
    return wf.tokenize(loaded.tokenizer, source, role="eval")


def perplexity(wf: Workflow, model: Any, ids: torch.Tensor, options: EvalOptions, stage: str,
               weights: str, score: Any = None) -> float:
    """Perplexity of ``model`` (or, for a backend whose model is not a torch module, of
    ``score(ids, seq_len)``) under an ``eval <stage>`` trace, recorded as ``perplexity_<stage>``
    with what the weights were."""
    from openpto.core.metrics import perplexity as measure
    from openpto.core.metrics import plan_windows

    seq_len, max_tokens = options.seq_len, options.max_tokens
    plan = plan_windows(len(ids), seq_len, max_tokens)
    with wf.run.trace(f"eval {stage}", windows=plan.windows, seq_len=seq_len) as attrs, \
            wf.progress.task(f"perplexity {stage}", total=plan.windows) as advance:
        if model is not None:
            value = measure(model, ids, seq_len, max_tokens=max_tokens,
                            progress=advance).perplexity
        else:
            value = float(score(ids[: plan.tokens], seq_len))
        attrs["perplexity"] = value
    wf.run.metric(f"perplexity_{stage}", value, "", {
        "seq_len": seq_len, "tokens": plan.tokens, "windows": plan.windows, "weights": weights,
    })
    return value


def count_layers(loaded: LoadedModel) -> int:
    from openpto.core.calibrate import decoder_layers

    return len(decoder_layers(loaded.model)[1])


def rss_peak_bytes() -> int:
    # ru_maxrss is in KiB on Linux: the process's peak resident set so far.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def layer_recorder(wf: Workflow, advance: Advance) -> Any:
    """The per-layer callback of both workflows: one ``layer N`` trace row (each Linear's error,
    seconds, peak memory, per-phase times, what the method reports per Linear) and a step of the
    progress bar."""

    def on_layer(event: LayerEvent) -> None:
        started = datetime.now(timezone.utc) - timedelta(seconds=event.seconds)
        # "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj"
        short = {r.name: r.name.split(f".{event.index}.", 1)[-1] for r in event.reports}
        errors = {short[r.name]: r.error for r in event.reports}
        values = [v for v in errors.values() if v is not None]
        wf.run.trace_row(
            f"layer {event.index}",
            started.isoformat(timespec="milliseconds"),
            event.seconds * 1000.0,
            {
                "index": event.index, "errors": errors,
                "mean_error": sum(values) / len(values) if values else None,
                "max_error": max(values) if values else None,
                "peak_memory_bytes": event.peak_memory_bytes,
                "peak_rss_bytes": rss_peak_bytes(),
                # Wall and CPU seconds per phase (forward, hessian, solve, pack) where measured.
                "phases": event.phases, "phases_cpu": event.phases_cpu,
                # What each method reports per Linear (GPTQ: dampening, refit, Hessian products).
                "linears": {short[r.name]: r.extra for r in event.reports if r.extra},
            },
        )
        layer = event.reports[0].name.split(f".{event.index}.", 1)[0] if event.reports else ""
        wf.progress.layer_done(index=event.index, total=event.total, seconds=event.seconds,
                               name=f"{layer}.{event.index}" if layer else f"layer {event.index}",
                               errors={k: v for k, v in errors.items() if v is not None})
        advance(1)

    return on_layer


def base_metadata(loaded: LoadedModel, config: MethodConfig) -> dict[str, Any]:
    """What every artifact's ``openpto.json`` says of its source and method."""
    from openpto import __version__

    return {
        "openpto_version": __version__,
        "source_model": loaded.name,
        "source_kind": loaded.kind,
        "source_path": str(loaded.path),
        "source_sha256": loaded.source_sha256,
        "method": config.type_name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
