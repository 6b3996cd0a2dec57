"""What every CLI command shares: JSON on stdout, Rich progress and messages on stderr."""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from openpto.progress import Advance

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


class RichProgress:
    """A ``ProgressReporter`` drawing Rich progress bars on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        if not self.enabled:
            yield _ignore
            return
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            transient=False,
        )
        with progress:
            task_id = progress.add_task(description, total=total)

            def advance(n: int = 1) -> None:
                progress.advance(task_id, n)

            yield advance

    def log(self, message: str) -> None:
        if self.enabled:
            stderr.print(message)


def _ignore(n: int = 1) -> None:
    """Advance that draws nothing."""
