"""Charts drawn with plotext (textual-plotext): per-layer error and time, and model comparisons."""

from __future__ import annotations

from textual_plotext import PlotextPlot


class LayerChart(PlotextPlot):
    """Mean error (left axis) and seconds (right axis) of each layer, as layers finish."""

    def on_mount(self) -> None:
        self.errors: list[float] = []
        self.seconds: list[float] = []
        self._draw()

    def reset(self) -> None:
        self.errors, self.seconds = [], []
        self._draw()

    def add_layer(self, error: float | None, seconds: float) -> None:
        self.errors.append(error if error is not None else 0.0)
        self.seconds.append(seconds)
        self._draw()

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title("per layer: mean error and seconds")
        if self.errors:
            xs = list(range(len(self.errors)))
            plt.plot(xs, self.errors, label="error", marker="braille")
            plt.plot(xs, self.seconds, label="seconds", yside="right", marker="braille")
        plt.xlabel("layer")
        self.refresh()


class CompareChart(PlotextPlot):
    """One bar group per measure (perplexity, size, speed), one bar per model."""

    def on_mount(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.measure = ""
        self._draw()

    def show(self, rows: dict[str, dict[str, float]], measure: str) -> None:
        self.rows, self.measure = rows, measure
        self._draw()

    def _draw(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        names = [n for n, r in self.rows.items() if self.measure in r]
        plt.title(self.measure or "run one or more models to compare them")
        if names:
            plt.bar([_short(n) for n in names], [self.rows[n][self.measure] for n in names],
                    width=0.4)
        self.refresh()


def _short(name: str, width: int = 18) -> str:
    name = name.rstrip("/").rsplit("/", 1)[-1]
    return name if len(name) <= width else name[: width - 1] + "…"
