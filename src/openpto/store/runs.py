"""Recording one run: a ``runs`` row written first, metrics and traces as the work goes, and a
final status of ``succeeded`` or ``failed`` with the error — Ctrl-C and crashes included."""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from openpto.store.db import Store, new_id, now_iso


class RunRecorder:
    """Use as ``with RunRecorder(store, "eval", model, config) as run: run.metric(...)``."""

    def __init__(
        self,
        store: Store,
        kind: str,
        model: str | None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.kind = kind
        self.model = model
        self.config = config or {}
        self.id = new_id()
        self.status = "running"

    def __enter__(self) -> RunRecorder:
        self.store.insert(
            "runs",
            {
                "id": self.id,
                "kind": self.kind,
                "status": "running",
                "model": self.model,
                "config": self.config,
                "started_at": now_iso(),
                "finished_at": None,
                "error": None,
            },
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.status = "succeeded"
            error = None
        else:
            self.status = "failed"
            # A one-line reason first, the traceback after it, so Datasette shows the reason.
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            error = reason + "\n" + "".join(traceback.format_exception(exc_type, exc, tb))
        self.store.update(
            "runs", self.id, {"status": self.status, "finished_at": now_iso(), "error": error}
        )

    def set_config(self, config: dict[str, Any]) -> None:
        self.config = {**self.config, **config}
        self.store.update("runs", self.id, {"config": self.config})

    def metric(
        self, name: str, value: float, unit: str = "", details: dict[str, Any] | None = None
    ) -> None:
        self.store.insert(
            "metrics",
            {
                "run_id": self.id,
                "name": name,
                "value": float(value),
                "unit": unit,
                "details": details or {},
            },
        )

    def trace_row(
        self, name: str, started_at: str, duration_ms: float, attributes: dict[str, Any] | None
    ) -> None:
        self.store.insert(
            "traces",
            {
                "run_id": self.id,
                "name": name,
                "started_at": started_at,
                "duration_ms": duration_ms,
                "attributes": attributes or {},
            },
        )

    @contextmanager
    def trace(self, name: str, **attributes: Any) -> Iterator[dict[str, Any]]:
        """Time a stage; the yielded dict can be filled with attributes during the stage."""
        started_at = now_iso()
        start = time.perf_counter()
        attrs: dict[str, Any] = dict(attributes)
        try:
            yield attrs
        except BaseException as exc:
            attrs["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.trace_row(name, started_at, (time.perf_counter() - start) * 1000.0, attrs)
