"""Runs: every table of ``opt.db`` with a filter and sorting, a run's detail, and Datasette."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Input, Label, Select, Static

from openpto.store.db import TABLES
from openpto.tui import data
from openpto.tui.jobs import job_env, opt_command
from openpto.tui.screens.base import SHOWN_ERRORS, OptScreen
from openpto.tui.servers import free_port, wait_for_http


class RunsScreen(OptScreen):
    TITLE = "Runs"
    HELP = ("Every table of opt.db: pick a table, type to filter, select a column header to "
            "sort, Enter on a run opens its detail. ctrl+o starts Datasette.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "refresh", "Refresh", id="runs.refresh"),
        Binding("ctrl+o", "datasette", "Datasette", id="runs.datasette"),
        Binding("ctrl+l", "focus_filter", "Filter", id="runs.filter"),
    ]

    def __init__(self) -> None:
        super().__init__(name="runs")
        self.sort_column: str | None = None
        self.descending = True
        self.datasette: asyncio.subprocess.Process | None = None
        self.datasette_url: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="runs-bar"):
            yield Select([(t, t) for t in TABLES], value="runs", allow_blank=False, id="table",
                         compact=True)
            yield Input(placeholder="filter: text in any column", id="filter", compact=True)
        yield Label("", id="runs-status", markup=False)
        yield DataTable(id="rows", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "opt.db"
        self.action_refresh()

    def on_screen_resume(self) -> None:
        self.action_refresh()

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def on_select_changed(self, event: Select.Changed) -> None:
        self.sort_column = None
        self.action_refresh()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.action_refresh()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        column = str(event.label)
        if self.sort_column == column:
            self.descending = not self.descending
        self.sort_column = column
        self.action_refresh()

    def action_refresh(self) -> None:
        table = self.query_one("#table", Select).value
        text = self.query_one("#filter", Input).value
        if isinstance(table, str):
            self.load(table, text, self.sort_column, self.descending)

    @work(thread=True, group="runs", exclusive=True)
    def load(self, table: str, text: str, order: str | None, descending: bool) -> None:
        try:
            store = self.opt.store()
            if order is None and table in ("runs", "models", "datasets", "prompts"):
                order = "started_at" if table == "runs" else "created_at"
            columns, rows = data.table_rows(store, table, text, order, descending)
        except SHOWN_ERRORS as exc:
            self.app.call_from_thread(self.fail, f"cannot read {table}: {exc}")
            return
        self.app.call_from_thread(self._fill, table, columns, rows, order)

    def _fill(self, table: str, columns: list[str], rows: list[dict[str, Any]],
              order: str | None) -> None:
        grid = self.query_one("#rows", DataTable)
        grid.clear(columns=True)
        for c in columns:
            grid.add_column(c + (" ▼" if c == order and self.descending else
                                 " ▲" if c == order else ""), key=c)
        for i, row in enumerate(rows):
            key = str(row.get("id", i)) if table == "runs" else str(i)
            grid.add_row(*[_cell(row.get(c)) for c in columns], key=key)
        sort = f", sorted by {order}" if order else ""
        self.query_one("#runs-status", Label).update(
            f"{table}: {len(rows)} rows{sort}" + (f" · Datasette at {self.datasette_url}"
                                                   if self.datasette_url else ""))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if self.query_one("#table", Select).value == "runs" and event.row_key.value:
            self.opt.show_run(event.row_key.value)

    def action_datasette(self) -> None:
        if self.datasette_url:
            self.notify(f"Datasette is at {self.datasette_url}")
            return
        self.start_datasette()

    @work(group="datasette", exclusive=True)
    async def start_datasette(self) -> None:
        port = free_port()
        self.notify("starting Datasette…")
        self.opt.store()  # create and migrate the database first
        self.datasette = await asyncio.create_subprocess_exec(
            *opt_command("db", "serve", "--port", str(port)),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, env=job_env(self.opt.db_path),
            start_new_session=True)
        url = f"http://127.0.0.1:{port}/"
        if not await wait_for_http(url, self.datasette, timeout=60):
            self.fail("Datasette did not start (is the 'db' extra installed?)")
            self.datasette = None
            return
        self.datasette_url = url
        self.notify(f"Datasette at {url}", title="Datasette", timeout=15)
        self.action_refresh()

    async def stop_datasette(self) -> None:
        if self.datasette is not None and self.datasette.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.datasette.terminate()
            await self.datasette.wait()
        self.datasette, self.datasette_url = None, None


def _cell(value: Any, width: int = 60) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


class RunDetail(OptScreen):
    """One run: its row and config, metrics, per-layer traces and its artifact."""

    TITLE = "Run"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back", id="run.back"),
    ]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="detail"):
            yield Static("", id="run-summary", markup=False)
            yield Label("metrics", classes="section")
            yield DataTable(id="metrics", cursor_type="row")
            yield Label("traces (stages and layers)", classes="section")
            yield DataTable(id="traces", cursor_type="row")
            yield Label("config", classes="section")
            yield Static("", id="run-config", markup=False)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = f"run {self.run_id}"
        self.load()

    @work(thread=True)
    def load(self) -> None:
        try:
            detail = data.run_detail(self.opt.store(), self.run_id)
        except SHOWN_ERRORS as exc:
            self.app.call_from_thread(self.fail, str(exc))
            return
        self.app.call_from_thread(self._fill, detail)

    def _fill(self, detail: dict[str, Any]) -> None:
        run = detail["run"]
        artifact = ", ".join(m["path"] for m in detail["models"]) or "-"
        error = (run.get("error") or "").splitlines()[:1]
        self.query_one("#run-summary", Static).update(
            f"{run['kind']} · {run['status']} · {run.get('model')}\n"
            f"{run.get('started_at')} → {run.get('finished_at') or '…'}\n"
            f"artifact: {artifact}" + (f"\nerror: {error[0]}" if error else ""))
        metrics = self.query_one("#metrics", DataTable)
        metrics.add_columns("name", "value", "unit")
        for m in detail["metrics"]:
            metrics.add_row(m["name"], f"{m['value']:.6g}" if m["value"] is not None else "",
                            m["unit"] or "")
        traces = self.query_one("#traces", DataTable)
        traces.add_columns("name", "ms", "attributes")
        for t in detail["traces"]:
            traces.add_row(t["name"], f"{t['duration_ms'] or 0:.1f}", _cell(t["attributes"], 50))
        self.query_one("#run-config", Static).update(
            json.dumps(run.get("config"), indent=2, default=str))
