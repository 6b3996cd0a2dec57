"""``evaluate``: the perplexity of one model on one text, recorded as an ``eval`` run.

    from openpto import EvalConfig, evaluate
    evaluate("smollm2-135m", EvalConfig(max_tokens=4096)).perplexity
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openpto.core.metrics import perplexity, plan_windows
from openpto.data import EVALUATION_DEFAULT, TextSource
from openpto.errors import UnsupportedModel, UsageError
from openpto.pipeline.common import Workflow, open_run
from openpto.pipeline.workflow import WorkflowResult
from openpto.progress import ProgressCallback

if TYPE_CHECKING:
    from openpto.models import LoadedModel
    from openpto.store import Store

DEFAULT_SEQ_LEN = 512
SPARSITY_KEYS = ("sparsity", "nm_compliant", "linear_params", "nonzero_linear_params")


@dataclass(frozen=True)
class EvalConfig:
    """How ``evaluate`` measures: the text, the windows, where and in which dtype."""

    text: str | TextSource | None = None  # None: the default evaluation text
    seq_len: int = DEFAULT_SEQ_LEN  # tokens per window (at least 2)
    max_tokens: int | None = None  # score at most this many tokens (None: the whole text)
    batch_size: int = 1  # windows per forward pass
    device: str = "cpu"
    dtype: str = "float32"
    text_field: str = "text"  # the field holding the text in JSONL or data set rows
    trust_remote_code: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["text"] = None if self.text is None else str(getattr(self.text, "name", self.text))
        return data


@dataclass
class EvalResult(WorkflowResult):
    """What ``evaluate`` measured; ``to_dict()`` is ``opt eval --json``'s object."""

    perplexity: float
    tokens: int  # fed to the model
    scored_tokens: int
    windows: int
    dropped_tokens: int
    seq_len: int
    seconds: float  # tokenize + score, not the model load
    text: str
    sparsity: float | None
    nm_compliant: dict[str, bool] | None
    linear_params: int | None
    nonzero_linear_params: int | None
    run_id: str


def evaluate(
    model: str | LoadedModel | None = None,
    config: EvalConfig | None = None,
    *,
    progress: ProgressCallback | None = None,
    store: Store | None = None,
) -> EvalResult:
    """Perplexity of ``model`` (a MODEL spec or a loaded model) on ``config.text`` (default
    ``stdlib-docstrings``), with the measured sparsity of the decoder Linears
    (``measure_sparsity``); the run, its traces, metrics and the data set are in the store.
    """
    config = config if config is not None else EvalConfig()
    from openpto.models import DEFAULT_ALIAS, LoadedModel

    # The run names the model asked for from the start, so a failed load still says which.
    run_model = model.name if isinstance(model, LoadedModel) else (model or DEFAULT_ALIAS)
    with open_run("eval", run_model, config.to_dict(), store=store, progress=progress) as wf:
        seq_len, max_tokens, batch_size = config.seq_len, config.max_tokens, config.batch_size
        _check_options(seq_len, max_tokens, batch_size)  # before anything slow is loaded
        text = wf.load_text(config.text, default=EVALUATION_DEFAULT, text_field=config.text_field)
        if isinstance(model, LoadedModel):
            loaded = model
            wf.store.update("runs", wf.run_id, {"model": loaded.name})
        else:
            loaded = wf.load_model(model, dtype=config.dtype, device=config.device,
                                   trust_remote_code=config.trust_remote_code)
        start = time.perf_counter()
        ids = wf.tokenize(loaded.tokenizer, text)
        plan = plan_windows(len(ids), seq_len, max_tokens)
        with wf.run.trace("eval", windows=plan.windows, seq_len=seq_len) as attrs, \
                wf.progress.task("perplexity", total=plan.windows) as advance:
            result = perplexity(
                loaded.model, ids, seq_len, max_tokens=max_tokens, batch_size=batch_size,
                progress=advance,
            )
            attrs.update(perplexity=result.perplexity, scored_tokens=result.scored_tokens)
        seconds = time.perf_counter() - start
        details: dict[str, Any] = {
            "seq_len": seq_len, "tokens": result.tokens, "scored_tokens": result.scored_tokens,
            "windows": plan.windows, "dropped_tokens": plan.dropped_tokens,
            "available_tokens": plan.available_tokens, "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "batch_size": batch_size, "text": text.name, "text_sha256": text.sha256,
        }
        # Artifacts on packed or 2:4 kernels say which ones ran (and, for 2:4, each Linear's
        # verdict); a number without it could be either.
        metadata = loaded.metadata or {}
        details.update({k: metadata[k] for k in ("kernel", "kernels", "sparse24")
                        if k in metadata})
        wf.run.metric("perplexity", result.perplexity, "", details)
        wf.run.metric("tokens", result.tokens, "tokens", {"scored_tokens": result.scored_tokens})
        timing = {"stages": "tokenize+eval", "device": details["device"]}
        wf.run.metric("seconds", seconds, "s", timing)
        sparsity = measure_sparsity(wf, loaded)
        if plan.dropped_tokens:
            wf.progress.log(
                f"scored {result.scored_tokens} tokens in {plan.windows} windows; "
                f"the last {plan.dropped_tokens} tokens do not fill a window and were dropped"
            )
        evaluated = EvalResult(
            perplexity=result.perplexity, tokens=result.tokens,
            scored_tokens=result.scored_tokens, windows=plan.windows,
            dropped_tokens=plan.dropped_tokens, seq_len=seq_len, seconds=seconds,
            text=text.name, **sparsity, run_id=wf.run_id,
        )
        wf.set_result(evaluated.to_dict())
        return evaluated


def measure_sparsity(wf: Workflow, loaded: LoadedModel) -> dict[str, Any]:
    """Sparsity of the decoder Linears counted from the weights the model holds, recorded as
    the ``sparsity`` and ``nonzero_linear_params`` metrics (per-layer values in the details).

    Measured for every model, pruned or not: counting zeros costs far less than the evaluation,
    and a dense model's near-zero value is itself the answer (the default model's Q4_1 grid
    holds a few exact zeros). Packed Linears are read back from the artifact's files. Returns
    ``sparsity``, ``nm_compliant`` (``{"2:4": bool, "4:8": bool}``), ``linear_params`` and
    ``nonzero_linear_params``, all ``None`` for a model whose decoder layers are not found.
    """
    from openpto.core.sparsity.metrics import model_sparsity

    metadata = loaded.metadata or {}
    packed = None
    if metadata.get("format") == "pack-quantized":
        from openpto.models.artifact_loaders import read_packed_weights

        packed = read_packed_weights(Path(loaded.path), None)
    try:
        summary = model_sparsity(loaded.model, packed)
    except UnsupportedModel as exc:
        wf.progress.log(f"sparsity not measured: {exc}")
        return dict.fromkeys(SPARSITY_KEYS)
    del packed
    compliant = {"2:4": summary.fits_2_4, "4:8": bool(summary.nm_compliant)}
    nonzero = summary.params - summary.zeros
    declared = metadata.get("sparsity") or {}
    how = {"scope": "Linears of the decoder layers", "measured": "zeros in the weights",
           "linears": len(summary.layers)}
    wf.run.metric("sparsity", summary.sparsity, "fraction", {
        **how, "params": summary.params, "zeros": summary.zeros, "nm_compliant": compliant,
        # what the artifact says it was pruned to, next to what the weights show
        "artifact_pattern": declared.get("pattern"), "artifact_target": declared.get("target"),
        "layers": {layer.name: round(layer.sparsity, 6) for layer in summary.layers},
    })
    wf.run.metric("nonzero_linear_params", nonzero, "params", {**how, "params": summary.params})
    return {"sparsity": summary.sparsity, "nm_compliant": compliant,
            "linear_params": summary.params, "nonzero_linear_params": nonzero}


def _check_options(seq_len: int, max_tokens: int | None, batch_size: int) -> None:
    if seq_len < 2:
        raise UsageError(
            f"--seq-len must be at least 2 (a window scores seq_len - 1 tokens), not {seq_len}"
        )
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be positive, not {max_tokens}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
