"""What every workflow shares: a recorded run, a traced model load, recorded data sets.

A workflow body runs inside ``open_run(...)``, which writes the ``runs`` row *before* any work,
so a model that fails to load, an empty text or a bad option still leaves a ``failed`` run with
its error::

    with open_run("eval", model_spec, config, store=store, progress=progress) as wf:
        text = wf.load_text(spec, default=EVALUATION_DEFAULT)
        loaded = wf.load_model(model_spec, dtype="float32", device="cpu")
        ids = wf.tokenize(loaded.tokenizer, text)
        with wf.run.trace("eval"):
            ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from openpto.progress import NullProgress, ProgressReporter
from openpto.store import RunRecorder, Store

if TYPE_CHECKING:
    import torch

    from openpto.data import TextSource
    from openpto.models import LoadedModel


class Workflow:
    """One recorded run in progress: its store, its recorder and its progress reporter."""

    def __init__(self, store: Store, run: RunRecorder, progress: ProgressReporter) -> None:
        self.store = store
        self.run = run
        self.progress = progress

    @property
    def run_id(self) -> str:
        return self.run.id

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
        with self.run.trace("load", spec=spec, dtype=dtype, device=device) as attrs:
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
def open_run(
    kind: str,
    model: str | None,
    config: dict[str, Any] | None = None,
    *,
    store: Store | None = None,
    progress: ProgressReporter | None = None,
) -> Iterator[Workflow]:
    """Open the store, write a ``running`` run row, and finish it as succeeded or failed."""
    store = store if store is not None else Store()
    with RunRecorder(store, kind, model, config) as run:
        yield Workflow(store, run, progress if progress is not None else NullProgress())
