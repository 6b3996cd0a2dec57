"""Progress reporting that the workflows emit and each front end renders its own way.

Workflows take a ``ProgressReporter``; the CLI passes a Rich one (stderr), the TUI one that posts
messages from its worker, tests and library callers the silent ``NullProgress``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

Advance = Callable[[int], None]


class ProgressReporter(Protocol):
    def task(self, description: str, total: int | None = None) -> AbstractContextManager[Advance]:
        """Open a task; the yielded function advances it by n steps."""
        ...

    def log(self, message: str) -> None:
        """A one-line status message (stderr in the CLI)."""
        ...


class NullProgress:
    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield _ignore

    def log(self, message: str) -> None:
        return None


def _ignore(n: int = 1) -> None:
    """Advance that draws nothing."""
