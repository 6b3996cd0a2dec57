"""``evaluate``: the perplexity of one model on one text, recorded as an ``eval`` run."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from openpto.core.metrics import perplexity, plan_windows
from openpto.data import EVALUATION_DEFAULT, TextSource
from openpto.errors import UsageError
from openpto.pipeline.common import open_run
from openpto.progress import ProgressReporter

if TYPE_CHECKING:
    from openpto.store import Store

DEFAULT_SEQ_LEN = 512


def evaluate(
    model_spec: str | None = None,
    text_source: str | TextSource | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    progress: ProgressReporter | None = None,
    store: Store | None = None,
    *,
    text_field: str = "text",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Perplexity of ``model_spec`` on ``text_source`` (default ``stdlib-docstrings``).

    Returns ``perplexity``, ``tokens`` (fed to the model), ``scored_tokens``, ``windows``,
    ``dropped_tokens``, ``seq_len``, ``seconds`` (tokenize + score, not the model load), ``text``
    and ``run_id``; the run, its traces, metrics and the data set are in the store.
    """
    config = {
        "text": None if text_source is None else str(getattr(text_source, "name", text_source)),
        "seq_len": seq_len, "max_tokens": max_tokens, "batch_size": batch_size,
        "device": device, "dtype": dtype, "text_field": text_field,
    }
    from openpto.models import DEFAULT_ALIAS

    # The run names the model asked for from the start, so a failed load still says which.
    run_model = model_spec or DEFAULT_ALIAS
    with open_run("eval", run_model, config, store=store, progress=progress) as wf:
        _check_options(seq_len, max_tokens, batch_size)  # before anything slow is loaded
        text = wf.load_text(text_source, default=EVALUATION_DEFAULT, text_field=text_field)
        loaded = wf.load_model(
            model_spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
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
        # Artifacts on packed kernels say which ones ran; a number without it could be either.
        metadata = loaded.metadata or {}
        details.update({k: metadata[k] for k in ("kernel", "kernels") if k in metadata})
        wf.run.metric("perplexity", result.perplexity, "", details)
        wf.run.metric("tokens", result.tokens, "tokens", {"scored_tokens": result.scored_tokens})
        timing = {"stages": "tokenize+eval", "device": details["device"]}
        wf.run.metric("seconds", seconds, "s", timing)
        if plan.dropped_tokens:
            wf.progress.log(
                f"scored {result.scored_tokens} tokens in {plan.windows} windows; "
                f"the last {plan.dropped_tokens} tokens do not fill a window and were dropped"
            )
        return {
            "perplexity": result.perplexity,
            "tokens": result.tokens,
            "scored_tokens": result.scored_tokens,
            "windows": plan.windows,
            "dropped_tokens": plan.dropped_tokens,
            "seq_len": seq_len,
            "seconds": seconds,
            "text": text.name,
            "run_id": wf.run_id,
        }


def _check_options(seq_len: int, max_tokens: int | None, batch_size: int) -> None:
    if seq_len < 2:
        raise UsageError(
            f"--seq-len must be at least 2 (a window scores seq_len - 1 tokens), not {seq_len}"
        )
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be positive, not {max_tokens}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
