"""What every workflow shares: a recorded run, progress events, a traced model load, data sets.

A workflow body runs inside ``open_run(...)``, which writes the ``runs`` row *before* any work,
so a model that fails to load, an empty text or a bad option still leaves a ``failed`` run with
its error::

    with open_run("eval", model_spec, config, store=store, progress=progress) as wf:
        text = wf.load_text(spec, default=EVALUATION_DEFAULT)
        loaded = wf.load_model(model_spec, dtype="float32", device="cpu")
        ids = wf.tokenize(loaded.tokenizer, text)
        with wf.run.trace("eval"), wf.progress.task("perplexity", total=n) as advance:
            ...
        return wf.set_result(result)

``progress`` is a callback receiving ``openpto.progress`` events: ``run_started`` once the row
exists, stages, layers, metrics and messages as they happen, and last ``run_finished`` (with the
summary given to ``set_result``) or ``run_failed`` — Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from openpto.progress import (
    ProgressCallback,
    ProgressEmitter,
    RunFailed,
    RunFinished,
    RunStarted,
    json_safe,
)
from openpto.store import RunRecorder, Store
from openpto.store.process import signals_held

Result = TypeVar("Result")

if TYPE_CHECKING:
    import torch

    from openpto.data import TextSource
    from openpto.models import LoadedModel


class Workflow:
    """One recorded run in progress: its store, its recorder and its progress emitter."""

    def __init__(self, store: Store, run: RunRecorder, progress: ProgressEmitter) -> None:
        self.store = store
        self.run = run
        self.progress = progress
        self.result: Mapping[str, Any] | None = None

    @property
    def run_id(self) -> str:
        return self.run.id

    def set_result(self, result: Result) -> Result:
        """Name the workflow's result (a mapping or a dataclass), carried JSON-safe by
        ``run_finished``; returns it, so a body can end with ``return wf.set_result(result)``."""
        # A result dataclass names itself by its CLI keys (``to_dict``), not by every field.
        to_dict = getattr(result, "to_dict", None)
        summary = json_safe(to_dict() if callable(to_dict) else result)
        self.result = summary if isinstance(summary, dict) else {"value": summary}
        return result

    def load_model(
        self,
        spec: str | None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        trust_remote_code: bool = False,
    ) -> LoadedModel:
        """Load a model under a ``load`` trace; the run's ``model`` becomes the resolved name."""
        from openpto.models import load_model

        self.progress.log(f"loading {spec or 'the default model'} ({dtype}, {device})")
        with self.run.trace("load", spec=spec, dtype=dtype, device=device) as attrs, \
                _library_bars_off():
            loaded = load_model(
                spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                progress=self.progress,
            )
            attrs.update(
                name=loaded.name, kind=loaded.kind, path=str(loaded.path),
                source_sha256=loaded.source_sha256,
            )
        self.store.update("runs", self.run.id, {"model": loaded.name})
        return loaded

    def load_text(
        self, spec: str | TextSource | None, *, default: str, text_field: str = "text"
    ) -> TextSource:
        """Read text under a ``data`` trace (a missing or empty text fails the run here)."""
        from openpto.data import load_text

        with self.run.trace("data", spec=None if spec is None else str(spec)) as attrs:
            source = load_text(spec, default=default, text_field=text_field)
            attrs.update(text=source.name, source=source.source, sha256=source.sha256)
        return source

    def tokenize(self, tokenizer: Any, source: TextSource, role: str = "eval") -> torch.Tensor:
        """Tokenize a whole text under a ``tokenize`` trace and record it as a data set."""
        from openpto.data import tokenize_text

        with self.run.trace("tokenize", text=source.name) as attrs:
            ids = tokenize_text(tokenizer, source)
            attrs["tokens"] = len(ids)
        self.record_dataset(source, len(ids), role)
        return ids

    def record_dataset(self, source: TextSource, tokens: int, role: str = "eval") -> str:
        """Add the text to the ``datasets`` table and name it in the run's config."""
        dataset_id = self.store.record_dataset(source.name, source.source, source.sha256, tokens)
        self.run.set_config(
            {f"{role}_data": {"id": dataset_id, "name": source.name, "sha256": source.sha256}}
        )
        return dataset_id


@contextmanager
def _library_bars_off() -> Iterator[None]:
    """transformers draws its own tqdm bars while it loads weights; a workflow reports through
    its progress callback alone (and stays silent without one), so they are off meanwhile."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


@contextmanager
def open_run(
    kind: str,
    model: str | None,
    config: dict[str, Any] | None = None,
    *,
    store: Store | None = None,
    progress: ProgressCallback | None = None,
) -> Iterator[Workflow]:
    """Open the store, write a ``running`` run row, and finish it as succeeded or failed; the
    progress callback (silent when None) sees the run start and, last of all, how it ended."""
    store = store if store is not None else Store()
    emitter = ProgressEmitter(progress)
    run = RunRecorder(store, kind, model, config, on_metric=emitter.metric)
    run.start()
    emitter.run_id = run.id
    start = time.perf_counter()
    workflow = Workflow(store, run, emitter)
    outcome: BaseException | None = None
    try:
        emitter.emit(RunStarted, kind=kind, model=model, config=config or {}, pid=os.getpid())
        yield workflow
    except BaseException as exc:
        outcome = exc
        raise
    finally:
        _close(run, emitter, workflow, outcome, time.perf_counter() - start)


def _close(run: RunRecorder, emitter: ProgressEmitter, workflow: Workflow,
           outcome: BaseException | None, seconds: float) -> None:
    """Record the final status, then send the last event (with signals held for both)."""
    with signals_held():
        run.finish(outcome)
        if outcome is None:
            emitter.emit(RunFinished, seconds=seconds, result=workflow.result)
        else:
            emitter.emit(RunFailed, error=run.reason or type(outcome).__name__, seconds=seconds)
