"""Long work as ``opt`` subprocesses: a job reads ``--progress jsonl`` events from the child's
stderr and its one JSON result from stdout, so a crash or Ctrl-C of the job never takes the UI
down, and the UI process never imports torch.

Cancelling sends SIGINT (the CLI then marks the run ``failed`` and writes no half artifact),
then SIGTERM, then SIGKILL if the child still has not exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openpto.progress import ProgressEvent, RunFailed, event_from_dict

#: seconds the child gets after each stop signal before the next, harder one
STOP_GRACE = (15.0, 10.0)


def opt_command(*args: str) -> list[str]:
    """The command line of ``opt ARGS`` in this interpreter (so the job sees the same install)."""
    return [sys.executable, "-m", "openpto", *args]


def job_env(db_path: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if db_path is not None:
        env["OPT_DB"] = str(db_path)
    # Plain UTF-8 output, no colour codes in the lines we parse.
    env.setdefault("PYTHONIOENCODING", "utf-8")
    env["NO_COLOR"] = "1"
    return env


@dataclass
class JobOutcome:
    """How a job ended: its exit status, its JSON result (None on failure) and its error."""

    returncode: int
    result: dict[str, Any] | None = None
    error: str | None = None
    run_id: str | None = None
    cancelled: bool = False
    events: int = 0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.error is None


@dataclass
class Job:
    """One ``opt`` subprocess. ``await job.run(on_event)`` returns its ``JobOutcome``."""

    args: Sequence[str]
    db_path: Path | None = None
    json_events: bool = True
    on_line: Callable[[str], None] | None = None
    process: asyncio.subprocess.Process | None = field(default=None, init=False)
    cancelled: bool = field(default=False, init=False)

    @property
    def command(self) -> list[str]:
        extra = ["--progress", "jsonl", "--json"] if self.json_events else ["--json"]
        return opt_command(*self.args, *extra)

    async def run(self, on_event: Callable[[ProgressEvent], None]) -> JobOutcome:
        self.process = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=job_env(self.db_path),
            start_new_session=True,  # a Ctrl-C typed in the UI's terminal is not the job's
        )
        outcome = JobOutcome(returncode=-1)
        assert self.process.stdout is not None and self.process.stderr is not None
        stdout_task = asyncio.ensure_future(self.process.stdout.read())
        try:
            async for raw in self.process.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                event = _parse_event(line)
                if event is None:
                    if line.strip() and self.on_line is not None:
                        self.on_line(line)
                    continue
                outcome.events += 1
                if event.run_id and outcome.run_id is None:
                    outcome.run_id = event.run_id
                if isinstance(event, RunFailed):
                    outcome.error = event.error
                on_event(event)
            out = await stdout_task
            outcome.returncode = await self.process.wait()
        except asyncio.CancelledError:
            await self.stop()
            raise
        outcome.cancelled = self.cancelled
        outcome.result = _last_json(out.decode("utf-8", "replace"))
        if outcome.returncode != 0:
            outcome.result = None
            if outcome.error is None:
                outcome.error = f"opt {self.args[0]} exited with status {outcome.returncode}"
        return outcome

    def interrupt(self) -> None:
        """Ask the job to stop (SIGINT, as Ctrl-C would); ``stop`` escalates if it must."""
        self.cancelled = True
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)

    async def stop(self) -> None:
        """Stop the job and wait for it: SIGINT, then SIGTERM, then SIGKILL."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        self.cancelled = True
        for signum, grace in ((signal.SIGINT, STOP_GRACE[0]), (signal.SIGTERM, STOP_GRACE[1])):
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
            try:
                await asyncio.wait_for(process.wait(), grace)
                return
            except asyncio.TimeoutError:
                continue
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def _parse_event(line: str) -> ProgressEvent | None:
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
        return event_from_dict(data) if isinstance(data, dict) else None
    except (ValueError, TypeError):
        return None


def _last_json(text: str) -> dict[str, Any] | None:
    """The JSON object a ``--json`` command printed (its last line that parses as one)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if isinstance(data, dict):
                    return data
    return None


async def run_json(args: Sequence[str], db_path: Path | None = None,
                   timeout: float = 120.0) -> dict[str, Any]:
    """``opt ARGS --json`` to completion: its JSON object, or ``JobFailed`` with the reason."""
    process = await asyncio.create_subprocess_exec(
        *opt_command(*args, "--json"), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=job_env(db_path))
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    result = _last_json(out.decode("utf-8", "replace"))
    if process.returncode != 0 or result is None:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit status {process.returncode}"
        raise JobFailed(f"opt {' '.join(args[:1])}: {reason.removeprefix('error: ')}")
    return result


async def python_json(code: str, timeout: float = 120.0) -> Any:
    """The JSON a short Python program prints (run in a child, so its imports stay there)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=job_env(None))
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    if process.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise JobFailed(lines[-1] if lines else f"exit status {process.returncode}")
    return json.loads(out.decode("utf-8"))


class JobFailed(Exception):
    """A helper subprocess failed; the message is its one-line reason."""
