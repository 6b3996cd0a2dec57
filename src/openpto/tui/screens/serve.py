"""Serve: start and stop ``opt serve`` on a free port, watch its traffic, try it in a chat box."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from typing import ClassVar

import httpx
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Input, Label, RichLog

from openpto.tui.jobs import job_env, opt_command
from openpto.tui.screens.base import OptScreen
from openpto.tui.servers import free_port, parse_metrics, wait_for_http
from openpto.tui.widgets.model_picker import ModelPicker

REQUESTS = "opt:http_requests_total"
TOKENS = "opt:generation_tokens_total"


class ServeScreen(OptScreen):
    TITLE = "Serve"
    HELP = ("Start opt serve (ctrl+r) on a free port, stop it (ctrl+g); requests and tokens/s "
            "come from /metrics; type in the chat box to try the model.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "start", "Start server", id="serve.start"),
        Binding("ctrl+g", "stop", "Stop server", id="serve.stop"),
        Binding("ctrl+l", "focus_chat", "Chat", id="serve.chat"),
    ]

    def __init__(self) -> None:
        super().__init__(name="serve")
        self.process: asyncio.subprocess.Process | None = None
        self.url: str | None = None
        self.api_key: str = ""
        self.history: list[dict[str, str]] = []
        self._last: tuple[float, float] | None = None
        self.model_id = "default"
        self.metrics_timer: Timer | None = None

    def compose(self) -> ComposeResult:
        defaults = self.opt.user_config.defaults
        yield Header()
        with Vertical(id="serve-form"):
            yield ModelPicker(str(defaults.get("model", "")), id="serve-model")
            with Horizontal(classes="field-row"):
                yield Label("backend", classes="field-name")
                yield Input("torch", id="backend", compact=True)
                yield Label("API key", classes="field-name")
                yield Input("", password=True, placeholder="(none)", id="api-key", compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Start (ctrl+r)", variant="primary", id="start", compact=True)
                yield Button("Stop (ctrl+g)", variant="error", id="stop", compact=True)
            yield Label("stopped", id="serve-status", markup=False)
            yield Label("", id="serve-metrics", markup=False)
        yield RichLog(id="chat-log", wrap=True, markup=False)
        yield Input(placeholder="say something to the served model (Enter sends)", id="chat",
                    compact=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "opt serve"

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()
        elif event.button.id == "stop":
            self.action_stop()

    def action_focus_chat(self) -> None:
        self.query_one("#chat", Input).focus()

    def action_start(self) -> None:
        if self.process is not None:
            self.notify(f"already serving at {self.url}")
            return
        self.start()

    def action_stop(self) -> None:
        if self.process is None:
            self.notify("no server is running")
            return
        self.stop_worker()

    @work(group="server", exclusive=True)
    async def start(self) -> None:
        port = free_port()
        args = ["serve"]
        model = self.query_one("#serve-model", ModelPicker).value
        if model:
            args.append(model)
        self.api_key = self.query_one("#api-key", Input).value.strip()
        args += ["--backend", self.query_one("#backend", Input).value.strip() or "torch",
                 "--port", str(port), "--json"]
        if self.api_key:
            args += ["--api-key", self.api_key]
        status = self.query_one("#serve-status", Label)
        status.update(f"starting opt {' '.join(a if a != self.api_key else '***' for a in args)}")
        self.process = await asyncio.create_subprocess_exec(
            *opt_command(*args), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=job_env(self.opt.db_path), start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        ok = await wait_for_http(f"{url}/health", self.process, timeout=300, ready_below=300)
        if not ok:
            reason = await self._stderr_tail()
            self.process = None
            status.update("stopped")
            self.fail(f"opt serve did not start: {reason}")
            return
        self.model_id = await self._served_model(url)
        self.url = url
        status.update(f"serving {self.model_id} at {url}/v1 (OpenAI) and {url}/api (Ollama)")
        self.notify(f"serving at {url}", title="Serve")
        self.metrics_timer = self.set_interval(1.0, self.poll_metrics, name="metrics")

    async def _served_model(self, url: str) -> str:
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(f"{url}/v1/models", headers=self.headers)
            models = response.json().get("data") or [{}]
            return str(models[0].get("id", "default"))
        except (httpx.HTTPError, ValueError):
            return "default"

    async def _stderr_tail(self) -> str:
        process = self.process
        if process is None or process.stderr is None:
            return "unknown"
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), 5)
        err = (await process.stderr.read()).decode("utf-8", "replace").strip().splitlines()
        return err[-1].removeprefix("error: ") if err else f"exit {process.returncode}"

    @work(group="server", exclusive=True)
    async def stop_worker(self) -> None:
        await self.stop_server()
        self.query_one("#serve-status", Label).update("stopped")
        self.query_one("#serve-metrics", Label).update("")
        self.notify("server stopped")

    async def stop_server(self) -> None:
        process, self.process, self.url = self.process, None, None
        if self.metrics_timer is not None:
            self.metrics_timer.stop()
            self.metrics_timer = None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def poll_metrics(self) -> None:
        if self.url is None:
            return
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                response = await client.get(f"{self.url}/metrics", headers=self.headers)
        except httpx.HTTPError:
            return
        values = parse_metrics(response.text)
        requests, tokens = values.get(REQUESTS, 0.0), values.get(TOKENS, 0.0)
        now = time.monotonic()
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = max(tokens - self._last[1], 0.0) / (now - self._last[0])
        self._last = (now, tokens)
        self.query_one("#serve-metrics", Label).update(
            f"requests {requests:.0f} · tokens generated {tokens:.0f} · {rate:.1f} tokens/s")

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "chat" or not event.value.strip():
            return
        if self.url is None:
            self.fail("start the server first (ctrl+r)")
            return
        text = event.value.strip()
        event.input.value = ""
        self.query_one("#chat-log", RichLog).write(f"you: {text}")
        self.history.append({"role": "user", "content": text})
        self.chat()

    @work(group="chat", exclusive=True)
    async def chat(self) -> None:
        log = self.query_one("#chat-log", RichLog)
        body = {"model": self.model_id, "messages": self.history[-10:], "max_tokens": 128,
                "stream": True}
        reply = ""
        try:
            async with httpx.AsyncClient(timeout=120.0) as client, client.stream(
                    "POST", f"{self.url}/v1/chat/completions", json=body,
                    headers=self.headers) as response:
                if response.status_code >= 400:
                    detail = (await response.aread()).decode("utf-8", "replace")
                    self.fail(f"the server answered {response.status_code}: {detail[:200]}")
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    reply += (choices[0].get("delta") or {}).get("content") or ""
        except httpx.HTTPError as exc:
            self.fail(f"chat request failed: {exc}")
            return
        self.history.append({"role": "assistant", "content": reply})
        # A terminal must not receive the model's control characters as they are.
        shown = "".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in reply)
        log.write(f"model: {shown}")
