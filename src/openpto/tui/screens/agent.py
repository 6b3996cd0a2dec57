"""Agent: chat with the ``opt agent`` agent. Text streams in, tool calls and their results
appear as they happen, and a tool that writes or runs long asks first in a modal dialog.

The agent runs in a child process (``openpto.tui.agent_child``, which calls
``openpto.agents.runner.run_agent``) speaking JSON lines, so that the model and the tools never
load torch into the UI process. Its endpoint: the base URL given here, else the Serve screen's
server, else the agent's own built-in server (started by the child).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, RichLog, Static

from openpto.tui.jobs import job_env
from openpto.tui.screens.base import OptScreen
from openpto.tui.screens.dialogs import Confirm


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
        self.child: asyncio.subprocess.Process | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(classes="field-row"):
            yield Label("base URL", classes="field-name")
            yield Input("", placeholder="/v1 URL (empty: the Serve screen's, else built-in)",
                        id="base-url", compact=True)
            yield Label("model", classes="field-name")
            yield Input("", placeholder="(the server's)", id="agent-model", compact=True)
        with Horizontal(classes="field-row"):
            yield Label("tools", classes="field-name")
            yield Input("", placeholder="names, comma-separated (empty: all)", id="agent-tools",
                        compact=True)
            yield Label("tool choice", classes="field-name")
            yield Input("", placeholder="auto, none, required or a tool", id="tool-choice",
                        compact=True)
        yield Label("session: new", id="agent-session", markup=False)
        yield RichLog(id="agent-log", wrap=True, markup=True)
        yield Static("", id="agent-reply", markup=False)
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
        if self.child is None:
            self.notify("the agent is not running")
            return
        with contextlib.suppress(ProcessLookupError):
            self.child.send_signal(signal.SIGINT)
        self.notify("stopping the agent…")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "prompt" or not event.value.strip():
            return
        prompt = event.value.strip()
        event.input.value = ""
        self.query_one("#agent-log", RichLog).write(f"[b]you:[/b] {_escape(prompt)}")
        self.ask(prompt)

    def base_url(self) -> str | None:
        typed = self.query_one("#base-url", Input).value.strip()
        if typed:
            return typed
        serve_url = self.opt.serving_url()
        return f"{serve_url}/v1" if serve_url else None

    @work(group="agent", exclusive=True)
    async def ask(self, prompt: str) -> None:
        log = self.query_one("#agent-log", RichLog)
        reply = self.query_one("#agent-reply", Static)
        settings: dict[str, Any] = {"base_url": self.base_url(), "session": self.session,
                    "model": self.query_one("#agent-model", Input).value.strip() or None,
                    "db_path": str(self.opt.db_path) if self.opt.db_path else None}
        tools = [t.strip() for t in self.query_one("#agent-tools", Input).value.split(",")
                 if t.strip()]
        if tools:
            settings["tools"] = tools
        choice = self.query_one("#tool-choice", Input).value.strip()
        if choice:
            settings["tool_choice"] = choice
        self.child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "openpto.tui.agent_child", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=job_env(self.opt.db_path), start_new_session=True)
        child = self.child
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write((json.dumps({"prompt": prompt, "settings": settings}) + "\n").encode())
        await child.stdin.drain()
        text: list[str] = []
        try:
            async for raw in child.stdout:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                kind = message.get("type")
                if kind == "TextDelta":
                    text.append(message.get("text", ""))
                    reply.update("agent: " + "".join(text))  # the reply as it streams in
                elif kind == "ToolCalled":
                    _flush(log, text)
                    reply.update("")
                    log.write(f"[cyan]→ {_escape(message.get('name', ''))}[/cyan]"
                              f"({_escape(_short(message.get('arguments')))})")
                elif kind == "ToolFinished":
                    colour = "green" if message.get("ok") else "red"
                    log.write(f"[{colour}]← {_escape(message.get('name', ''))}: "
                              f"{_escape(_short(message.get('output')))}[/{colour}]")
                elif kind == "confirm":
                    dialog: Screen[bool] = Confirm(
                        f"Let the agent run {message.get('name')}?", message.get("arguments"))
                    answer = bool(await self.app.push_screen_wait(dialog))  # type: ignore[arg-type]
                    child.stdin.write((json.dumps({"answer": answer}) + "\n").encode())
                    await child.stdin.drain()
                elif kind == "result":
                    streamed = bool(text)
                    _flush(log, text)
                    reply.update("")
                    if not streamed and message.get("output"):
                        log.write(f"[b]agent:[/b] {_escape(str(message['output']))}")
                    self.session = message.get("session") or self.session
                    self.query_one("#agent-session", Label).update(
                        f"session: {self.session} · run {message.get('run_id')}")
                elif kind == "error":
                    self.fail(f"agent: {message.get('error')}")
            await child.wait()
        finally:
            await self.stop_child()
        self.opt.runs_changed()

    async def stop_child(self) -> None:
        child, self.child = self.child, None
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(child.wait(), 10)
            except asyncio.TimeoutError:
                child.kill()
                await child.wait()

    async def stop_server(self) -> None:
        """Called when the app exits: the agent's process goes with it."""
        await self.stop_child()


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
