"""Agent: chat with the ``opt agent`` agent. Text streams in, tool calls and their results
appear as they happen, and a tool that writes or runs long asks first in a modal dialog.

The agent runs in this process through ``openpto.agents.runner.run_agent`` (imported by name:
front ends never import each other statically), against an OpenAI-compatible endpoint: the
base URL given here, else the Serve screen's server, else an ``opt serve`` child this screen
starts, so the model itself never loads into the UI process.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, RichLog, Static

from openpto.tui.jobs import job_env, opt_command
from openpto.tui.screens.base import SHOWN_ERRORS, OptScreen
from openpto.tui.screens.dialogs import Confirm
from openpto.tui.servers import free_port, wait_for_http


class AgentScreen(OptScreen):
    TITLE = "Agent"
    HELP = ("Chat with the opt agent: Enter sends; tool calls show as they happen; tools that "
            "write or run long ask first.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+l", "focus_prompt", "Prompt", id="agent.prompt"),
        Binding("ctrl+g", "cancel", "Cancel", id="agent.cancel"),
        Binding("ctrl+n", "new_session", "New session", id="agent.new"),
    ]

    def __init__(self) -> None:
        super().__init__(name="agent")
        self.session: str | None = None
        self.server: asyncio.subprocess.Process | None = None
        self.server_url: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="field-row"):
            yield Label("base URL", classes="field-name")
            yield Input("", placeholder="OpenAI-compatible /v1 URL (empty: a local opt serve)",
                        id="base-url", compact=True)
            yield Label("model", classes="field-name")
            yield Input("", placeholder="(the server's)", id="agent-model", compact=True)
        yield Label("session: new", id="agent-session")
        yield RichLog(id="agent-log", wrap=True, markup=True)
        yield Static("", id="agent-reply")
        yield Input(placeholder="ask the agent, e.g. which artifacts do I have?", id="prompt",
                    compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "opt agent"

    def action_focus_prompt(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_new_session(self) -> None:
        self.session = None
        self.query_one("#agent-session", Label).update("session: new")
        self.query_one("#agent-log", RichLog).clear()

    def action_cancel(self) -> None:
        self.workers.cancel_group(self, "agent")
        self.notify("agent run cancelled")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "prompt" or not event.value.strip():
            return
        prompt = event.value.strip()
        event.input.value = ""
        self.query_one("#agent-log", RichLog).write(f"[b]you:[/b] {_escape(prompt)}")
        self.ask(prompt)

    async def base_url(self) -> str:
        typed = self.query_one("#base-url", Input).value.strip()
        if typed:
            return typed
        serve_url = self.opt.serving_url()
        if serve_url:
            return f"{serve_url}/v1"
        if self.server_url is None:
            port = free_port()
            self.notify("starting a local opt serve for the agent…")
            self.server = await asyncio.create_subprocess_exec(
                *opt_command("serve", "--port", str(port)), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env=job_env(self.opt.db_path), start_new_session=True)
            url = f"http://127.0.0.1:{port}"
            if not await wait_for_http(f"{url}/health", self.server, timeout=300,
                                       ready_below=300):
                self.server = None
                raise OSError("the local opt serve did not start")
            self.server_url = url
        return f"{self.server_url}/v1"

    @work(group="agent", exclusive=True)
    async def ask(self, prompt: str) -> None:
        log = self.query_one("#agent-log", RichLog)
        try:
            runner = importlib.import_module("openpto.agents.runner")
        except ImportError as exc:
            self.fail(f"the agent is not available: {exc} (pip install 'openpto[agents]')")
            return
        try:
            base_url = await self.base_url()
        except SHOWN_ERRORS as exc:
            self.fail(str(exc))
            return
        model = self.query_one("#agent-model", Input).value.strip() or None
        settings = runner.AgentSettings(base_url=base_url, model=model, session=self.session,
                                        db_path=Path(self.opt.db_path) if self.opt.db_path
                                        else None)
        text: list[str] = []
        reply = self.query_one("#agent-reply", Static)

        def on_event(event: Any) -> None:
            kind = type(event).__name__
            if kind == "TextDelta":
                text.append(event.text)
                reply.update("agent: " + "".join(text))  # the reply as it streams in
            elif kind == "ToolCalled":
                _flush(log, text)
                reply.update("")
                log.write(f"[cyan]→ {event.name}[/cyan]({_escape(_short(event.arguments))})")
            elif kind == "ToolFinished":
                colour = "green" if event.ok else "red"
                log.write(f"[{colour}]← {event.name}: {_escape(_short(event.output))}[/{colour}]")

        async def confirm(name: str, arguments: dict[str, Any]) -> bool:
            dialog: Screen[bool] = Confirm(f"Let the agent run {name}?", arguments)
            return bool(await self.app.push_screen_wait(dialog))  # type: ignore[arg-type]

        try:
            result = await runner.run_agent(prompt, settings, confirm=confirm, on_event=on_event)
        except NotImplementedError as exc:
            self.fail(f"the agent runner is not available in this version: {exc}")
            return
        except SHOWN_ERRORS as exc:
            self.fail(f"agent: {exc}")
            return
        streamed = bool(text)
        _flush(log, text)
        reply.update("")
        if not streamed and result.output:
            log.write(f"[b]agent:[/b] {_escape(result.output)}")
        self.session = result.session or self.session
        self.query_one("#agent-session", Label).update(
            f"session: {self.session} · run {result.run_id}")
        self.opt.runs_changed()

    async def stop_server(self) -> None:
        if self.server is not None and self.server.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.server.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.server.wait(), 15)
            except asyncio.TimeoutError:
                self.server.kill()
                await self.server.wait()
        self.server, self.server_url = None, None


def _flush(log: RichLog, text: list[str]) -> None:
    if text:
        log.write(f"[b]agent:[/b] {_escape(''.join(text))}")
        text.clear()


def _short(value: Any, width: int = 200) -> str:
    s = str(value)
    return s if len(s) <= width else s[: width - 1] + "…"


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
