"""Quantize and Sparsify: a model, a form built from the registered configs, a size preview,
then the job with its per-layer bar, chart and log, and the before/after numbers at the end."""

from __future__ import annotations

from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    TabbedContent,
    TabPane,
)

from openpto.progress import ProgressEvent
from openpto.tui.forms import describe, set_args
from openpto.tui.jobs import Job, JobOutcome
from openpto.tui.screens.base import SHOWN_ERRORS, OptScreen
from openpto.tui.units import human_bytes
from openpto.tui.widgets.job_panel import JobPanel
from openpto.tui.widgets.method_form import MethodForm
from openpto.tui.widgets.model_picker import ModelPicker

#: options shared by both commands: (flag, label, default, kind)
COMMON_OPTIONS = [
    ("calib", "calibration text", "", "str"),
    ("samples", "calibration samples", "128", "int"),
    ("calib-seq-len", "tokens per sample", "512", "int"),
    ("device", "device", "cpu", "str"),
    ("eval", "evaluate on (before/after)", "", "str"),
    ("output", "output folder", "", "str"),
]
QUANT_OPTIONS = [("backend", "backend", "torch", "str")]


class CompressScreen(OptScreen):
    """``kind`` is ``quantization`` (``opt quantize``) or ``sparsity`` (``opt sparsify``)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "run", "Run", id="job.run"),
        Binding("ctrl+o", "preview", "Size preview", id="job.preview"),
        Binding("ctrl+g", "cancel", "Cancel job", id="job.cancel"),
        Binding("ctrl+f", "browse", "Browse model", id="job.browse"),
    ]

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.command = "quantize" if kind == "quantization" else "sparsify"
        super().__init__(name=self.command)
        self.job: Job | None = None
        self.last_outcome: JobOutcome | None = None
        self.options = COMMON_OPTIONS + (QUANT_OPTIONS if kind == "quantization" else [])

    def compose(self) -> ComposeResult:
        defaults = self.opt.user_config.defaults
        yield Header()
        with TabbedContent(id="tabs"):
            with TabPane("Setup", id="setup"), VerticalScroll():
                yield ModelPicker(str(defaults.get("model", "")), id="model")
                yield MethodForm(initial="gptq" if self.kind == "quantization" else "wanda",
                                 id="form")
                for flag, label, default, _ in self.options:
                    value = str(defaults.get(flag.replace("-", "_"), default))
                    yield Horizontal(Label(label, classes="field-name"),
                                     Input(value, id=f"opt-{flag}",
                                           placeholder="(default)", compact=True),
                                     classes="field-row")
                yield Label("size preview: ctrl+o", id="preview", markup=False)
                with Horizontal(classes="buttons"):
                    yield Button("Run (ctrl+r)", variant="primary", id="run", compact=True)
                    yield Button("Size preview (ctrl+o)", id="preview-button", compact=True)
                    yield Button("Cancel (ctrl+g)", variant="error", id="cancel", compact=True)
            with TabPane("Progress", id="progress"):
                yield JobPanel(id="panel")
            with TabPane("Result", id="result"):
                yield DataTable(id="result-table", cursor_type="row")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.sub_title = f"opt {self.command}"
        self.query_one("#result-table", DataTable).add_columns("measure", "before", "after")
        self.load_methods()

    @work(group="catalog")
    async def load_methods(self) -> None:
        try:
            await self.opt.catalog.methods()
        except SHOWN_ERRORS as exc:
            self.fail(f"cannot read the registered methods: {exc}")
            return
        self.query_one(MethodForm).set_methods(self.opt.catalog.of_kind(self.kind))

    # -- building the command line ---------------------------------------------------------
    def command_args(self, dry_run: bool = False) -> list[str]:
        """The ``opt quantize|sparsify`` arguments of the form; ValueError says what is wrong."""
        form = self.query_one(MethodForm)
        method = form.method
        values = form.values()
        assert method is not None
        args = [self.command]
        model = self.query_one(ModelPicker).value
        if model:
            args.append(model)
        args += ["--method", method.name, *set_args(values)]
        for flag, label, _, kind in self.options:
            text = self.query_one(f"#opt-{flag}", Input).value.strip()
            if not text:
                continue
            if kind == "int" and not (text.isdigit() and int(text) > 0):
                raise ValueError(f"{label}: {text!r} is not a positive whole number")
            args += [f"--{flag}", text]
        if dry_run:
            args.append("--dry-run")
        return args

    # -- actions ---------------------------------------------------------------------------
    def on_button_pressed(self, event: Button.Pressed) -> None:
        actions = {"run": self.action_run, "preview-button": self.action_preview,
                   "cancel": self.action_cancel}
        if event.button.id in actions:
            actions[event.button.id]()

    def action_browse(self) -> None:
        self.query_one(ModelPicker).browse()

    def action_run(self) -> None:
        if self.job is not None:
            self.notify("a job is already running (ctrl+g cancels it)", severity="warning")
            return
        try:
            args = self.command_args()
        except ValueError as exc:
            self.fail(str(exc))
            return
        self.query_one("#tabs", TabbedContent).active = "progress"
        self.query_one(JobPanel).reset(f"opt {' '.join(args)}")
        self.run_job(args)

    def action_preview(self) -> None:
        try:
            args = self.command_args(dry_run=True)
        except ValueError as exc:
            self.fail(str(exc))
            return
        self.query_one("#preview", Label).update("size preview: loading the model…")
        self.preview(args)

    def action_cancel(self) -> None:
        if self.job is None:
            self.notify("no job is running")
            return
        self.job.interrupt()
        self.notify("stopping the job (the run will be marked failed)…")

    @work(group="preview", exclusive=True)
    async def preview(self, args: list[str]) -> None:
        job = Job(args, db_path=self.opt.db_path)
        outcome = await job.run(lambda event: None)
        label = self.query_one("#preview", Label)
        if not outcome.ok or outcome.result is None:
            label.update(f"size preview: {outcome.error}")
            self.fail(outcome.error or "the dry run failed")
            return
        r = outcome.result
        before, after = r.get("size_bytes_before"), r.get("size_bytes_after")
        label.update(f"size preview: {human_bytes(before)} → about {human_bytes(after)} "
                     f"into {r.get('output')}")

    @work(group="job", exclusive=True)
    async def run_job(self, args: list[str]) -> None:
        panel = self.query_one(JobPanel)
        self.job = Job(args, db_path=self.opt.db_path, on_line=panel.write)

        def on_event(event: ProgressEvent) -> None:
            panel.handle(event)

        try:
            outcome = await self.job.run(on_event)
        finally:
            self.job = None
        self.last_outcome = outcome
        self.opt.runs_changed()
        if outcome.ok and outcome.result is not None:
            self.show_result(outcome.result)
            self.notify(f"{self.command} finished: {outcome.result.get('output')}",
                        title="done")
        elif outcome.cancelled:
            self.notify(f"{self.command} cancelled: run {outcome.run_id} marked failed",
                        severity="warning")
        else:
            self.fail(f"{self.command} failed: {outcome.error}")

    def show_result(self, result: dict[str, Any]) -> None:
        table = self.query_one("#result-table", DataTable)
        table.clear()
        table.add_row("size", human_bytes(result.get("size_bytes_before")),
                      human_bytes(result.get("size_bytes_after")))
        if "perplexity_before" in result:
            table.add_row("perplexity", f"{result['perplexity_before']:.4g}",
                          f"{result.get('perplexity_after', float('nan')):.4g}")
        for key in ("sparsity", "seconds", "output", "run_id"):
            if key in result:
                value = result[key]
                text = f"{value:.4g}" if isinstance(value, float) else str(value)
                table.add_row(key, "", text)
        table.add_row("config", "", describe({k: result.get(k) for k in ("method", "bits",
                                                                         "group_size")}))
        self.query_one("#tabs", TabbedContent).active = "result"


class QuantizeScreen(CompressScreen):
    TITLE = "Quantize"
    HELP = ("Quantize a model: pick it (ctrl+f browses), fill the method's form (checked as you "
            "type), preview the size (ctrl+o), run (ctrl+r), cancel (ctrl+g).")

    def __init__(self) -> None:
        super().__init__("quantization")


class SparsifyScreen(CompressScreen):
    TITLE = "Sparsify"
    HELP = ("Prune a model (magnitude, Wanda, SparseGPT; a sparsity or an N:M pattern): "
            "preview (ctrl+o), run (ctrl+r), cancel (ctrl+g).")

    def __init__(self) -> None:
        super().__init__("sparsity")
