"""A running job, as it happens: the stage and its bar, the per-layer chart, and the log."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar, RichLog

from openpto.progress import (
    LayerDone,
    Message,
    Metric,
    ProgressEvent,
    RunFailed,
    RunFinished,
    RunStarted,
    RunWarning,
    StageFinished,
    StageProgress,
    StageStarted,
)
from openpto.tui.widgets.charts import LayerChart


class JobPanel(Vertical):
    """Feed it events with ``handle``; it keeps the latest metrics in ``metrics``."""

    def __init__(self, *, chart: bool = True, id: str | None = None) -> None:
        super().__init__(id=id, classes="job-panel")
        self.with_chart = chart
        self.metrics: dict[str, float] = {}
        self.layers_done = 0

    def compose(self) -> ComposeResult:
        yield Label("idle", id="job-stage", markup=False)
        yield ProgressBar(total=1, id="job-bar", show_eta=True)  # idle: not animated
        if self.with_chart:
            yield LayerChart(id="layer-chart")
        yield RichLog(id="job-log", wrap=True, markup=False, max_lines=2000)

    @property
    def log_widget(self) -> RichLog:
        return self.query_one("#job-log", RichLog)

    def reset(self, title: str) -> None:
        self.metrics.clear()
        self.layers_done = 0
        self.query_one("#job-stage", Label).update(title)
        self.query_one("#job-bar", ProgressBar).update(total=None, progress=0)
        self.log_widget.clear()
        if self.with_chart:
            self.query_one(LayerChart).reset()

    def write(self, line: str) -> None:
        self.log_widget.write(line)

    def handle(self, event: ProgressEvent) -> None:
        bar = self.query_one("#job-bar", ProgressBar)
        stage = self.query_one("#job-stage", Label)
        if isinstance(event, RunStarted):
            self.write(f"run {event.run_id} started ({event.kind})")
        elif isinstance(event, StageStarted):
            stage.update(event.stage)
            bar.update(total=event.total, progress=0)
            self.write(f"▶ {event.stage}")
        elif isinstance(event, StageProgress):
            bar.update(total=event.total, progress=event.completed)
        elif isinstance(event, StageFinished):
            bar.update(total=event.total or event.completed, progress=event.completed)
            tail = f" ({event.error})" if event.error else ""
            self.write(f"■ {event.stage}: {event.seconds:.2f} s{tail}")
        elif isinstance(event, LayerDone):
            self.layers_done = event.index + 1
            stage.update(f"layer {event.index + 1}/{event.total}: {event.name}")
            bar.update(total=event.total, progress=event.index + 1)
            mean = event.mean_error
            if self.with_chart:
                self.query_one(LayerChart).add_layer(mean, event.seconds)
            err = f", mean error {mean:.4g}" if mean is not None else ""
            self.write(f"{event.name}: {event.seconds:.2f} s{err}")
        elif isinstance(event, Metric):
            self.metrics[event.name] = event.value
            self.write(f"{event.name} = {event.value:.6g} {event.unit}".rstrip())
        elif isinstance(event, Message):
            self.write(event.message)
        elif isinstance(event, RunWarning):
            self.write(f"warning: {event.message}")
        elif isinstance(event, RunFinished):
            stage.update("finished")
            self.write(f"run finished in {event.seconds or 0:.1f} s")
        elif isinstance(event, RunFailed):
            stage.update(f"failed: {event.error}")
            self.write(f"run failed: {event.error}")
