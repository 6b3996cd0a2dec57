"""Recording one run: a ``runs`` row written first, metrics and traces as the work goes, and a
final status of ``succeeded`` or ``failed`` with the error — Ctrl-C and SIGTERM included.

The row names its process (pid, host, start time): a process killed outright cannot write its
final status, so the next command that opens the store closes the run for it
(``Store.close_stale_runs``)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from openpto.store.db import Store, new_id, now_iso
from openpto.store.process import current_process, signals_held

#: called with (name, value, unit) after each metric row is written
MetricListener = Callable[[str, float, str], None]

def error_text(exc: BaseException) -> tuple[str, str]:
    """The one-line reason (``Type: message``) and the stored error: reason, then traceback."""
    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return reason, reason + "\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)
    )


class RunRecorder:
    """Use as ``with RunRecorder(store, "eval", model, config) as run: run.metric(...)``."""

    def __init__(
        self,
        store: Store,
        kind: str,
        model: str | None,
        config: dict[str, Any] | None = None,
        *,
        on_metric: MetricListener | None = None,
    ) -> None:
        self.store = store
        self.kind = kind
        self.model = model
        self.config = config or {}
        self.id = new_id()
        self.status = "running"
        self.reason: str | None = None  # the failure's one-line reason, once failed
        self.on_metric = on_metric

    def start(self) -> None:
        """Write the ``running`` row (with this process's id) before any work."""
        process = current_process()
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
                "pid": process.pid,
                "host": process.host,
                "process_started": process.started,
            },
        )

    def finish(self, exc: BaseException | None = None) -> None:
        """Write the final status: ``succeeded``, or ``failed`` with ``exc``'s reason first and
        its traceback after it (so Datasette shows the reason). Signals wait until it is written."""
        with signals_held():
            if exc is None:
                self.status, error = "succeeded", None
            else:
                self.status = "failed"
                self.reason, error = error_text(exc)
            self.store.update(
                "runs", self.id, {"status": self.status, "finished_at": now_iso(), "error": error}
            )

    def __enter__(self) -> RunRecorder:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(exc)

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
        if self.on_metric is not None:
            self.on_metric(name, float(value), unit)

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
