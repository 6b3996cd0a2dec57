"""Home: this machine, recent runs, artifacts, and a quick action for each workflow."""

from __future__ import annotations

from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import Button, DataTable, Footer, Header, Label, Static

from openpto.tui.jobs import run_json
from openpto.tui.screens.base import SHOWN_ERRORS, OptScreen
from openpto.tui.units import human_bytes

QUICK_ACTIONS = [
    ("quantize", "Quantize"), ("sparsify", "Sparsify"), ("measure", "Evaluate"),
    ("serve", "Serve"), ("agent", "Agent"), ("runs", "Runs"), ("settings", "Settings"),
]
KEYS_HINT = ("F2 Home · F3 Quantize · F4 Sparsify · F5 Evaluate · F6 Serve · F7 Agent · "
             "F8 Runs · F9 Settings · F1 or ? help · ctrl+p every action")


def machine_summary(info: dict[str, Any]) -> str:
    devices = ", ".join(f"{d.get('type')}: {d.get('name')} ({human_bytes(d.get('memory_bytes'))})"
                        for d in info.get("devices", []))
    backends = info.get("backends", {})
    ready = [name for name, b in backends.items() if b.get("available")]
    return (f"python {info.get('python')} · torch {info.get('torch')}\n"
            f"devices: {devices or '-'}\n"
            f"available: {', '.join(ready) or '-'} ({len(ready)}/{len(backends)} backends)")


class HomeScreen(OptScreen):
    TITLE = "Home"
    HELP = "This machine, recent runs and artifacts; a button for each workflow."
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "refresh", "Refresh", id="home.refresh"),
    ]

    def __init__(self) -> None:
        super().__init__(name="home")

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="home"):
            yield Static("reading this machine (opt info)…", id="machine", markup=False)
            yield Label(KEYS_HINT, classes="help")
            with Horizontal(id="quick"):
                for name, label in QUICK_ACTIONS:
                    yield Button(label, id=f"go-{name}", classes="quick", compact=True)
            with Grid(id="home-tables"):
                with Vertical():
                    yield Label("recent runs", classes="section")
                    yield DataTable(id="recent", cursor_type="row", zebra_stripes=True)
                with Vertical():
                    yield Label("artifacts", classes="section")
                    yield DataTable(id="artifacts", cursor_type="row", zebra_stripes=True)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "openpto"
        self.query_one("#recent", DataTable).add_columns("started", "kind", "status", "model")
        self.query_one("#artifacts", DataTable).add_columns("artifact", "method", "size")
        self.load_machine()
        self.action_refresh()

    def on_screen_resume(self) -> None:
        self.action_refresh()

    def action_refresh(self) -> None:
        self.load_tables()

    @work(group="machine")
    async def load_machine(self) -> None:
        try:
            info = await self.opt.machine_info()
        except SHOWN_ERRORS as exc:
            self.query_one("#machine", Static).update(f"opt info failed: {exc}")
            return
        self.query_one("#machine", Static).update(machine_summary(info))

    @work(thread=True, group="home-tables", exclusive=True)
    def load_tables(self) -> None:
        from openpto.tui import data  # the store's imports wait until after the first paint

        try:
            store = self.opt.store()
            runs, models = data.recent_runs(store), data.artifacts(store)
        except SHOWN_ERRORS as exc:
            self.app.call_from_thread(self.fail, f"cannot read the database: {exc}")
            return
        self.app.call_from_thread(self._fill, runs, models)

    def _fill(self, runs: list[dict[str, Any]], models: list[dict[str, Any]]) -> None:
        recent = self.query_one("#recent", DataTable)
        recent.clear()
        for r in runs:
            recent.add_row((r["started_at"] or "")[5:16].replace("T", " "), r["kind"],
                           r["status"], _tail(r["model"]), key=r["id"])
        table = self.query_one("#artifacts", DataTable)
        table.clear()
        for m in models:
            table.add_row(_tail(m["path"], 40), m["method"], human_bytes(m["size_bytes"]),
                          key=m["id"])

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id and event.button.id.startswith("go-"):
            self.opt.action_go(event.button.id.removeprefix("go-"))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "recent" and event.row_key.value:
            self.opt.show_run(event.row_key.value)


def _tail(text: str | None, width: int = 28) -> str:
    text = text or ""
    return text if len(text) <= width else "…" + text[-(width - 1):]


async def machine_info_json() -> dict[str, Any]:
    return await run_json(["info"])
