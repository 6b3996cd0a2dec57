"""What every CLI command shares: JSON on stdout; progress events on stderr (Rich or JSON lines)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import warnings
from enum import Enum
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

from openpto.progress import (
    LayerDone,
    Message,
    ProgressCallback,
    ProgressEvent,
    RunFailed,
    RunFinished,
    RunStarted,
    RunWarning,
    StageFinished,
    StageProgress,
    StageStarted,
)

stderr = Console(stderr=True)

JSON_HELP = "Print one JSON object on stdout and nothing else there."


def command_help(fn: object) -> str:
    """A command's docstring as Typer help text.

    Typer keeps single line breaks inside help paragraphs; joining them lets Rich reflow."""
    paragraphs = inspect.cleandoc(getattr(fn, "__doc__", "") or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def emit(result: dict[str, Any], as_json: bool, title: str = "") -> None:
    """Print a result: one JSON object on stdout, or a two-column table for people."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=title or None, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in result.items():
        if isinstance(value, float):
            text = f"{value:.6g}"
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        table.add_row(key, text)
    Console().print(table)


_BAR_WIDTH = 16
_COUNTS_WIDTH = 26  # "12/30", elapsed, remaining and the gaps between the columns


class RichProgress:
    """Progress events drawn with Rich on stderr: a bar per stage (moving with its steps, the
    latest layer and its mean error beside it), messages, and warnings in yellow."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console if console is not None else stderr
        self._bars: Progress | None = None
        self._stages: list[tuple[str, TaskID]] = []  # open stages, innermost last

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        if isinstance(event, StageStarted):
            bars = self._open_bars()
            self._stages.append((event.stage, bars.add_task(event.stage, total=event.total,
                                                            note="")))
        elif isinstance(event, StageProgress):
            task = self._task(event.stage)
            if task is not None and self._bars is not None:
                self._bars.update(task, completed=event.completed)
        elif isinstance(event, StageFinished):
            self._finish_stage(event)
        elif isinstance(event, LayerDone):
            self._layer(event)
        elif isinstance(event, Message):
            self.console.print(escape(event.message), highlight=False)
        elif isinstance(event, RunWarning):
            self.console.print(f"[yellow]warning:[/yellow] {escape(event.message)}",
                               highlight=False)
        elif isinstance(event, (RunFinished, RunFailed)):
            self._close_bars()

    def log(self, message: str) -> None:
        """A message outside any workflow (what a ``message`` event would print)."""
        if self.enabled:
            self.console.print(escape(message), highlight=False)

    def _open_bars(self) -> Progress:
        if self._bars is None:
            self._bars = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=_BAR_WIDTH),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}", table_column=Column(no_wrap=True)),
                console=self.console,
                transient=False,
            )
            self._bars.start()
        return self._bars

    def _task(self, stage: str) -> TaskID | None:
        for name, task in reversed(self._stages):
            if name == stage:
                return task
        return None

    def _finish_stage(self, event: StageFinished) -> None:
        task = self._task(event.stage)
        if task is None or self._bars is None:
            return
        total = event.total if event.total is not None else event.completed
        self._bars.update(task, total=total, completed=event.completed)
        if event.error:
            self._bars.update(task, note=f"[red]{escape(event.error)}[/red]")
        self._bars.stop_task(task)
        self._stages = [(n, t) for n, t in self._stages if t != task]
        if not self._stages:
            self._close_bars()

    def _layer(self, event: LayerDone) -> None:
        mean = event.mean_error
        note = (f"mean error {mean:.4g}, " if mean is not None else "") + (
            f"{event.name} ({event.index + 1}/{event.total}) {event.seconds:.2f} s")
        if not self._stages or self._bars is None:
            self.console.print(escape(note), highlight=False)
            return
        stage, task = self._stages[-1]
        # Rich would squeeze the bar and the counts to fit a long note; cut the note instead.
        room = self.console.width - len(stage) - _BAR_WIDTH - _COUNTS_WIDTH
        if len(note) > room:
            note = note[: max(room - 1, 0)] + "…"
        self._bars.update(task, note=escape(note))

    def _close_bars(self) -> None:
        if self._bars is not None:
            self._bars.stop()
        self._bars = None
        self._stages = []


class JsonlProgress:
    """Progress events as JSON lines on a stream (stderr by default): one object per line,
    flushed as it happens, for programs that read ``opt ... --progress jsonl``."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.run_id: str | None = None  # the run whose events are being written, if any
        self.last: ProgressEvent | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if isinstance(event, RunStarted):
            self.run_id = event.run_id
        elif isinstance(event, (RunFinished, RunFailed)):
            self.run_id = None
        self.last = event
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(json.dumps(event.to_dict(), allow_nan=False) + "\n")
        stream.flush()

    def warn(self, message: str, category: str | None = None) -> None:
        """A warning raised outside the workflow's own events (Python warnings, log records),
        written only while a run is open so that a run's last line stays its outcome."""
        if self.run_id is not None:
            self(RunWarning(run_id=self.run_id, message=message, category=category))

    def fail(self, error: str) -> None:
        """An error the CLI reports: already carried by the ``run_failed`` just written, or an
        error outside any run, written as ``run_failed`` with no run id."""
        if isinstance(self.last, RunFailed):
            return
        self(RunFailed(run_id=None, error=error))


class ProgressMode(str, Enum):
    rich = "rich"
    jsonl = "jsonl"
    none = "none"


PROGRESS_HELP = (
    "How progress goes to stderr: rich (bars), jsonl (one JSON event per line, nothing else on "
    "stderr) or none."
)

#: the ``--progress`` option every command that runs a workflow takes
ProgressOption = Annotated[
    ProgressMode, typer.Option("--progress", help=PROGRESS_HELP, show_default=True)
]

MODEL_HELP = "Alias, folder, .gguf file, artifact or cached hub id (default smollm2-135m)."

# The argument and options many commands share, declared once; each command gives the default.
#: the MODEL argument of every command that loads one model
ModelArgument = Annotated[str | None, typer.Argument(help=MODEL_HELP)]
DeviceOption = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps.")]
DtypeOption = Annotated[str, typer.Option(help="float32, bfloat16 or float16.")]
JsonOption = Annotated[bool, typer.Option("--json", help=JSON_HELP)]

# Set by ``claim_stderr_for_jsonl`` when this process's stderr carries only JSON events.
_jsonl_sink: JsonlProgress | None = None


def progress_for(mode: ProgressMode | str) -> ProgressCallback | None:
    """The progress callback of a ``--progress`` mode (None, i.e. silent, for ``none``)."""
    mode = ProgressMode(mode)
    if mode is ProgressMode.rich:
        return RichProgress()
    if mode is ProgressMode.jsonl:
        return _jsonl_sink if _jsonl_sink is not None else JsonlProgress()
    return None


def jsonl_requested(argv: list[str]) -> bool:
    """Whether a command line asks for ``--progress jsonl`` (read before Typer parses it, so
    that even a usage error is reported as JSON)."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--progress=jsonl" or (
            arg == "--progress" and i + 1 < len(argv) and argv[i + 1] == "jsonl"
        ):
            return True
    return False


def claim_stderr_for_jsonl() -> JsonlProgress:
    """Keep this process's stderr for JSON events alone: the events go to a copy of file
    descriptor 2, which itself (and so every other writer: Rich, tqdm bars, C libraries,
    child processes) points at the null device from here on; Python warnings and log records
    become ``warning`` events."""
    global _jsonl_sink
    if _jsonl_sink is not None:
        return _jsonl_sink
    sys.stderr.flush()
    events = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    # Progress bars of libraries would only be thrown away; do not draw them at all.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sink = JsonlProgress(events)

    def show_warning(message: Warning | str, category: type[Warning], filename: str,
                     lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
        sink.warn(str(message), category.__name__)

    warnings.showwarning = show_warning
    logging.getLogger().addHandler(_WarningHandler(sink))
    _jsonl_sink = sink
    return sink


class _WarningHandler(logging.Handler):
    def __init__(self, sink: JsonlProgress) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.warn(record.getMessage(), record.name)
