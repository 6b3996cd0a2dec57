"""Evaluate / Profile / Bench: run on one or several models, watch tokens/s as they come, and
compare perplexity, size and speed side by side in a bar chart."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, Select

from openpto.progress import Metric, ProgressEvent
from openpto.tui.jobs import Job
from openpto.tui.screens.base import OptScreen
from openpto.tui.units import human_bytes
from openpto.tui.widgets.charts import CompareChart
from openpto.tui.widgets.job_panel import JobPanel

MODES = [("evaluate (perplexity)", "eval"), ("profile (speed)", "profile"),
         ("bench (speed, all at once)", "bench")]
MEASURES = [("perplexity", "perplexity"), ("size on disk", "size_bytes"),
            ("decode tokens/s", "decode_tokens_per_second"),
            ("prefill tokens/s", "prefill_tokens_per_second"), ("TTFT ms", "ttft_ms")]
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")


def weights_size(model: str) -> int | None:
    """Bytes of a local model's weight files (None for an alias or a hub id)."""
    path = Path(model).expanduser()
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)


class MeasureScreen(OptScreen):
    TITLE = "Evaluate"
    HELP = ("Evaluate, profile or bench one or several models (separated by spaces); the chart "
            "compares the measure you pick.")
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "run", "Run", id="measure.run"),
        Binding("ctrl+g", "cancel", "Cancel", id="measure.cancel"),
        Binding("ctrl+l", "next_measure", "Next chart", id="measure.chart"),
    ]

    def __init__(self) -> None:
        super().__init__(name="measure")
        self.rows: dict[str, dict[str, float]] = {}
        self.job: Job | None = None

    def compose(self) -> ComposeResult:
        defaults = self.opt.user_config.defaults
        yield Header()
        with Vertical(id="measure-form"):
            with Horizontal(classes="field-row"):
                yield Select(MODES, value="eval", allow_blank=False, id="mode", compact=True)
                yield Input(str(defaults.get("model", "")), id="models",
                            placeholder="models, separated by spaces (default smollm2-135m)",
                            compact=True)
            with Horizontal(classes="field-row"):
                yield Label("eval --max-tokens", classes="field-name")
                yield Input("4096", id="max-tokens", compact=True)
                yield Label("--prompt-len/--gen-len", classes="field-name")
                yield Input("128 128", id="lens", compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Run (ctrl+r)", variant="primary", id="run", compact=True)
                yield Button("Cancel (ctrl+g)", variant="error", id="cancel", compact=True)
                yield Select(MEASURES, value="perplexity", allow_blank=False, id="measure",
                             compact=True)
            yield Label("", id="live", markup=False)
        with Horizontal(id="measure-out"):
            yield DataTable(id="measure-table", cursor_type="row")
            yield CompareChart(id="compare")
        yield JobPanel(chart=False, id="measure-panel")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = "opt eval · opt profile · opt bench"
        self.query_one("#measure-table", DataTable).add_columns(
            "model", "perplexity", "size", "decode tok/s", "TTFT ms")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "run":
            self.action_run()
        elif event.button.id == "cancel":
            self.action_cancel()

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "measure":
            self._redraw()

    def action_next_measure(self) -> None:
        select = self.query_one("#measure", Select)
        names = [m for _, m in MEASURES]
        current = names.index(str(select.value)) if select.value in names else 0
        select.value = names[(current + 1) % len(names)]

    def action_cancel(self) -> None:
        if self.job is None:
            self.notify("no job is running")
            return
        self.job.interrupt()
        self.notify("stopping…")

    def job_args(self) -> list[list[str]]:
        mode = str(self.query_one("#mode", Select).value)
        models = shlex.split(self.query_one("#models", Input).value) or [""]
        lens = self.query_one("#lens", Input).value.split()
        if mode in ("profile", "bench") and (len(lens) != 2 or not all(x.isdigit() for x in lens)):
            raise ValueError("--prompt-len/--gen-len: two whole numbers, e.g. 128 128")
        max_tokens = self.query_one("#max-tokens", Input).value.strip()
        if mode == "eval":
            if max_tokens and not max_tokens.isdigit():
                raise ValueError(f"--max-tokens {max_tokens!r} is not a whole number")
            extra = ["--max-tokens", max_tokens] if max_tokens else []
            return [["eval", *([m] if m else []), *extra] for m in models]
        speed = ["--prompt-len", lens[0], "--gen-len", lens[1]]
        if mode == "bench":
            if len(models) < 1 or models == [""]:
                raise ValueError("bench needs at least one model")
            return [["bench", *models, *speed]]
        return [["profile", *([m] if m else []), *speed] for m in models]

    def action_run(self) -> None:
        if self.job is not None:
            self.notify("a job is already running", severity="warning")
            return
        try:
            jobs = self.job_args()
        except ValueError as exc:
            self.fail(str(exc))
            return
        self.run_jobs(jobs)

    @work(group="measure", exclusive=True)
    async def run_jobs(self, jobs: list[list[str]]) -> None:
        panel = self.query_one(JobPanel)
        live = self.query_one("#live", Label)
        for args in jobs:
            model = args[1] if len(args) > 1 and not args[1].startswith("--") else "smollm2-135m"
            panel.reset(f"opt {' '.join(args)}")

            def on_event(event: ProgressEvent, model: str = model) -> None:
                panel.handle(event)
                if isinstance(event, Metric) and "tokens_per_second" in event.name:
                    live.update(f"{model}: {event.name} {event.value:.1f}")

            self.job = Job(args, db_path=self.opt.db_path, on_line=panel.write)
            try:
                outcome = await self.job.run(on_event)
            finally:
                self.job = None
            self.opt.runs_changed()
            if not outcome.ok or outcome.result is None:
                self.fail(f"opt {args[0]} {model}: {outcome.error}")
                return
            results = outcome.result.get("results") if args[0] == "bench" else None
            for one in results or [outcome.result]:
                name = str(one.get("model") or model)
                self.add_result(name, one)
        self.notify("measurements done", title="done")

    def add_result(self, model: str, result: dict[str, Any]) -> None:
        row = self.rows.setdefault(model, {})
        for key, value in result.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key] = float(value)
        size = weights_size(model)
        if size is not None:
            row["size_bytes"] = float(size)
        table = self.query_one("#measure-table", DataTable)
        table.clear()
        for name, r in self.rows.items():
            table.add_row(name[-30:], _num(r.get("perplexity")),
                          human_bytes(r.get("size_bytes")) if "size_bytes" in r else "-",
                          _num(r.get("decode_tokens_per_second")), _num(r.get("ttft_ms")))
        self._redraw()

    def _redraw(self) -> None:
        measure = str(self.query_one("#measure", Select).value)
        self.query_one(CompareChart).show(self.rows, measure)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
