"""Progress as typed events: what a workflow reports while it runs, for every front end to render.

A workflow takes ``progress=``, a callable receiving one ``ProgressEvent`` at a time; without it
the library is silent. Each event is a frozen dataclass with ``to_dict()`` giving the JSON object
that ``opt ... --progress jsonl`` writes, one per line::

    {"event": "layer_done", "run_id": "3f2a...", "time": "2026-12-07T23:40:01.123+00:00",
     "index": 3, "total": 30, "name": "model.layers.3", "seconds": 0.41,
     "error": {"self_attn.q_proj": 0.0012, ...}}

The events of one run start with ``run_started`` and end with ``run_finished`` or
``run_failed``; ``run_failed`` with ``run_id`` null reports an error before any run existed.
``time`` is ISO 8601 in UTC with milliseconds, as in the run database.

``ProgressEmitter`` is what a workflow holds: it stamps the run id and the time, and keeps the
older ``task(description, total)`` / ``log(message)`` reporter shape working for loaders.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any, ClassVar, Protocol

Advance = Callable[[int], None]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    """Fields every event carries; ``event`` (the JSON name) is a class constant."""

    event: ClassVar[str] = ""
    run_id: str | None
    time: str = field(default_factory=now_iso)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object for this event: ``event``, ``run_id``, ``time``, then its fields."""
        out: dict[str, Any] = {"event": self.event}
        for f in dataclasses.fields(self):
            out[f.name] = json_safe(getattr(self, f.name))
        return out


@dataclass(frozen=True, kw_only=True)
class RunStarted(ProgressEvent):
    """The run row was written: everything after this belongs to ``run_id``."""

    event: ClassVar[str] = "run_started"
    kind: str
    model: str | None
    config: Mapping[str, Any] = field(default_factory=dict)
    pid: int | None = None


@dataclass(frozen=True, kw_only=True)
class StageStarted(ProgressEvent):
    """A stage began; ``total`` is its number of steps when known."""

    event: ClassVar[str] = "stage_started"
    stage: str
    total: int | None = None


@dataclass(frozen=True, kw_only=True)
class StageProgress(ProgressEvent):
    """Steps completed so far within a stage, so a bar can move before the stage ends."""

    event: ClassVar[str] = "stage_progress"
    stage: str
    completed: int
    total: int | None = None


@dataclass(frozen=True, kw_only=True)
class StageFinished(ProgressEvent):
    """A stage ended; ``error`` is its one-line reason when it ended by an exception."""

    event: ClassVar[str] = "stage_finished"
    stage: str
    completed: int
    total: int | None
    seconds: float
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class LayerDone(ProgressEvent):
    """One decoder layer was compressed; ``error`` maps each Linear to its method's error."""

    event: ClassVar[str] = "layer_done"
    index: int
    total: int
    name: str
    seconds: float
    error: Mapping[str, float] = field(default_factory=dict)

    @property
    def mean_error(self) -> float | None:
        values = [v for v in self.error.values() if v is not None and math.isfinite(v)]
        return sum(values) / len(values) if values else None


@dataclass(frozen=True, kw_only=True)
class Metric(ProgressEvent):
    """A measurement was recorded in the run's ``metrics`` table."""

    event: ClassVar[str] = "metric"
    name: str
    value: float
    unit: str = ""


@dataclass(frozen=True, kw_only=True)
class Message(ProgressEvent):
    """A one-line status message for people (what a log line would say)."""

    event: ClassVar[str] = "message"
    message: str


@dataclass(frozen=True, kw_only=True)
class RunWarning(ProgressEvent):
    """Something the user should know that did not stop the run."""

    event: ClassVar[str] = "warning"
    message: str
    category: str | None = None


@dataclass(frozen=True, kw_only=True)
class RunFinished(ProgressEvent):
    """The run succeeded; ``result`` is the workflow's JSON-safe summary where it returns one."""

    event: ClassVar[str] = "run_finished"
    status: str = "succeeded"
    seconds: float | None = None
    result: Mapping[str, Any] | None = None


@dataclass(frozen=True, kw_only=True)
class RunFailed(ProgressEvent):
    """The run failed (an error, Ctrl-C or SIGTERM); ``error`` is the one-line reason."""

    event: ClassVar[str] = "run_failed"
    error: str
    status: str = "failed"
    seconds: float | None = None


EVENT_TYPES: dict[str, type[ProgressEvent]] = {
    cls.event: cls
    for cls in (RunStarted, StageStarted, StageProgress, StageFinished, LayerDone, Metric,
                Message, RunWarning, RunFinished, RunFailed)
}

ProgressCallback = Callable[[ProgressEvent], None]


def event_from_dict(data: Mapping[str, Any]) -> ProgressEvent:
    """The typed event of one parsed JSON line (what a front end reading ``jsonl`` needs).

    Keys this version does not know are ignored, so newer producers stay readable."""
    name = data.get("event")
    cls = EVENT_TYPES.get(str(name))
    if cls is None:
        raise ValueError(f"unknown progress event {name!r} (known: {', '.join(EVENT_TYPES)})")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON: mappings with string keys, lists, finite numbers (non-finite
    floats become null, which strict JSON parsers accept), and text for anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    item = getattr(value, "item", None)  # numpy and torch scalars
    if callable(item):
        try:
            return json_safe(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def error_reason(exc: BaseException) -> str:
    """One line naming an exception: ``Type: message`` (the type alone when it has none)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class ProgressReporter(Protocol):
    """The stage-and-message shape that loaders take (``ProgressEmitter`` provides it)."""

    def task(self, description: str, total: int | None = None) -> AbstractContextManager[Advance]:
        """Open a task; the yielded function advances it by n steps."""
        ...

    def log(self, message: str) -> None:
        """A one-line status message."""
        ...


class ProgressEmitter:
    """Builds events stamped with the run id and the time and hands them to ``callback``.

    Without a callback every method does nothing, so library calls stay silent. A callback
    that raises stops the workflow: a front end that cannot show progress should say so."""

    def __init__(self, callback: ProgressCallback | None = None,
                 run_id: str | None = None) -> None:
        self.callback = callback
        self.run_id = run_id

    def emit(self, cls: type[ProgressEvent], **fields: Any) -> None:
        if self.callback is not None:
            self.callback(cls(run_id=self.run_id, **fields))

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        """A stage: ``stage_started``, a ``stage_progress`` per advance, ``stage_finished``."""
        if self.callback is None:
            yield _ignore
            return
        completed = 0
        start = time.perf_counter()

        def advance(n: int = 1) -> None:
            nonlocal completed
            completed += n
            self.emit(StageProgress, stage=description, completed=completed, total=total)

        self.emit(StageStarted, stage=description, total=total)
        error = None
        try:
            yield advance
        except BaseException as exc:
            error = error_reason(exc)
            raise
        finally:
            self.emit(StageFinished, stage=description, completed=completed, total=total,
                      seconds=time.perf_counter() - start, error=error)

    def log(self, message: str) -> None:
        self.emit(Message, message=message)

    def warning(self, message: str, category: str | None = None) -> None:
        self.emit(RunWarning, message=message, category=category)

    def metric(self, name: str, value: float, unit: str = "") -> None:
        self.emit(Metric, name=name, value=float(value), unit=unit)

    def layer_done(self, *, index: int, total: int, name: str, seconds: float,
                   errors: Mapping[str, float] | None = None) -> None:
        """A decoder layer finished; ``errors`` maps each of its Linears to its error."""
        self.emit(LayerDone, index=index, total=total, name=name, seconds=float(seconds),
                  error={k: float(v) for k, v in (errors or {}).items()})


class NullProgress(ProgressEmitter):
    """The silent reporter (an emitter without a callback)."""

    def __init__(self) -> None:
        super().__init__(None)


def _ignore(n: int = 1) -> None:
    """Advance that draws nothing."""
