"""Typed progress events: their JSON shapes, the emitter, and the events of a recorded run."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from openpto.progress import (
    EVENT_TYPES,
    LayerDone,
    Message,
    Metric,
    ProgressEmitter,
    ProgressEvent,
    RunFailed,
    RunFinished,
    RunStarted,
    RunWarning,
    StageFinished,
    StageProgress,
    StageStarted,
    event_from_dict,
    json_safe,
)
from openpto.store import Store

COMMON = ["event", "run_id", "time"]
EXAMPLES: list[tuple[ProgressEvent, list[str]]] = [
    (RunStarted(run_id="r1", kind="quantize", model="m", config={"bits": 4}, pid=7),
     ["kind", "model", "config", "pid"]),
    (StageStarted(run_id="r1", stage="quantize", total=3), ["stage", "total"]),
    (StageProgress(run_id="r1", stage="quantize", completed=1, total=3),
     ["stage", "completed", "total"]),
    (StageFinished(run_id="r1", stage="quantize", completed=3, total=3, seconds=0.5),
     ["stage", "completed", "total", "seconds", "error"]),
    (LayerDone(run_id="r1", index=2, total=3, name="model.layers.2", seconds=0.25,
               error={"self_attn.q_proj": 0.5, "mlp.up_proj": 1.5}),
     ["index", "total", "name", "seconds", "error"]),
    (Metric(run_id="r1", name="perplexity", value=12.5, unit=""), ["name", "value", "unit"]),
    (Message(run_id="r1", message="loading m"), ["message"]),
    (RunWarning(run_id="r1", message="slow", category="UserWarning"), ["message", "category"]),
    (RunFinished(run_id="r1", seconds=2.0, result={"output": "/x"}),
     ["status", "seconds", "result"]),
    (RunFailed(run_id="r1", error="UsageError: bad", seconds=1.0), ["error", "status", "seconds"]),
]


@pytest.mark.parametrize(("event", "fields"), EXAMPLES, ids=lambda e: getattr(e, "event", ""))
def test_each_event_has_its_json_shape(event: ProgressEvent, fields: list[str]) -> None:
    data = event.to_dict()
    assert list(data) == COMMON + fields
    assert data["event"] == type(event).event and data["run_id"] == "r1"
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    # A reader of the JSON lines gets the same typed event back.
    assert event_from_dict(json.loads(json.dumps(data))) == event


def test_every_event_type_is_covered_and_names_are_the_contract() -> None:
    assert {type(e).event for e, _ in EXAMPLES} == set(EVENT_TYPES)
    assert set(EVENT_TYPES) >= {"run_started", "stage_started", "stage_finished", "layer_done",
                                "metric", "warning", "run_finished", "run_failed"}


def test_specific_values_survive_and_unknown_events_are_refused() -> None:
    layer = EXAMPLES[4][0]
    assert isinstance(layer, LayerDone) and layer.mean_error == 1.0
    assert layer.to_dict()["error"] == {"self_attn.q_proj": 0.5, "mlp.up_proj": 1.5}
    with pytest.raises(AttributeError):
        layer.index = 5  # type: ignore[misc]  # frozen
    with pytest.raises(ValueError, match="unknown progress event 'nope'"):
        event_from_dict({"event": "nope", "run_id": None})
    newer = {**EXAMPLES[6][0].to_dict(), "added_later": 1}
    assert event_from_dict(newer) == EXAMPLES[6][0]


def test_json_safe_turns_library_values_into_plain_json() -> None:
    import torch

    value = json_safe({"p": Path("/a/b"), "t": (1, 2), "inf": math.inf, "nan": math.nan,
                       "scalar": torch.tensor(2.5), 3: {"x"}})
    assert value == {"p": "/a/b", "t": [1, 2], "inf": None, "nan": None, "scalar": 2.5,
                     "3": ["x"]}
    json.dumps(value, allow_nan=False)


def test_emitter_task_reports_stage_steps_and_failure() -> None:
    events: list[ProgressEvent] = []
    emitter = ProgressEmitter(events.append, run_id="r9")
    with emitter.task("perplexity", total=3) as advance:
        advance(1)
        advance(2)
    assert [type(e) for e in events] == [StageStarted, StageProgress, StageProgress, StageFinished]
    assert [e.completed for e in events[1:3]] == [1, 3]  # type: ignore[attr-defined]
    finished = events[-1]
    assert isinstance(finished, StageFinished)
    assert (finished.completed, finished.total, finished.error) == (3, 3, None)
    assert finished.seconds >= 0 and all(e.run_id == "r9" for e in events)

    events.clear()
    with pytest.raises(RuntimeError, match="boom"), emitter.task("save") as advance:
        advance(1)
        raise RuntimeError("boom")
    assert isinstance(events[-1], StageFinished) and events[-1].error == "RuntimeError: boom"


def test_emitter_without_callback_is_silent(capfd: pytest.CaptureFixture[str]) -> None:
    emitter = ProgressEmitter(None)
    with emitter.task("x", total=2) as advance:
        advance(2)
    emitter.log("hello")
    emitter.warning("careful")
    emitter.layer_done(index=0, total=1, name="l0", seconds=0.1, errors={"a": 1.0})
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_a_run_starts_with_run_started_and_ends_with_run_finished(tmp_path: Path) -> None:
    from openpto.pipeline.common import open_run

    events: list[ProgressEvent] = []
    store = Store(tmp_path / "opt.db")
    with open_run("eval", "m", {"seq_len": 8}, store=store, progress=events.append) as wf:
        wf.run.metric("perplexity", 12.5, "")
        wf.progress.warning("careful")
        wf.progress.layer_done(index=0, total=1, name="model.layers.0", seconds=0.1,
                               errors={"mlp.up_proj": 0.25})
        wf.set_result({"perplexity": 12.5, "output": tmp_path})
    first, *middle, last = events
    assert isinstance(first, RunStarted) and first.run_id == wf.run_id
    assert (first.kind, first.model, dict(first.config)) == ("eval", "m", {"seq_len": 8})
    assert [type(e) for e in middle] == [Metric, RunWarning, LayerDone]
    assert (middle[0].name, middle[0].value) == ("perplexity", 12.5)  # type: ignore[attr-defined]
    assert isinstance(last, RunFinished) and last.run_id == wf.run_id
    assert last.result == {"perplexity": 12.5, "output": str(tmp_path)}
    assert store.rows("runs")[0]["status"] == "succeeded"


@pytest.mark.parametrize("exc", [RuntimeError("no such model"), KeyboardInterrupt()])
def test_a_failed_run_ends_with_run_failed(tmp_path: Path, exc: BaseException) -> None:
    from openpto.pipeline.common import open_run

    events: list[ProgressEvent] = []
    store = Store(tmp_path / "opt.db")
    with pytest.raises(type(exc)), \
            open_run("eval", "m", store=store, progress=events.append) as wf:
        raise exc
    last = events[-1]
    assert isinstance(last, RunFailed) and last.run_id == wf.run_id
    assert last.error == (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    row = store.rows("runs")[0]
    assert row["status"] == "failed" and row["error"].startswith(last.error)


def test_a_library_quantize_without_progress_prints_nothing(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    import openpto
    from tests.helpers import tiny_llama, tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    capfd.readouterr()
    result = openpto.quantize(str(folder), openpto.RTNConfig(bits=4, group_size=32),
                              openpto.QuantizeOptions(output=tmp_path / "out"),
                              store=Store(tmp_path / "opt.db"))
    assert Path(result.output).is_dir()
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_rich_renderer_draws_stages_layers_messages_and_warnings() -> None:
    from rich.console import Console

    from openpto.cli.common import RichProgress

    buffer = io.StringIO()
    render = RichProgress(console=Console(file=buffer, width=160, force_terminal=False))
    emitter = ProgressEmitter(render, run_id="r1")
    emitter.log("loading [tiny] model")
    with emitter.task("quantize (rtn w4)", total=2) as advance:
        for i in range(2):
            emitter.layer_done(index=i, total=2, name=f"model.layers.{i}", seconds=0.5,
                               errors={"a": 0.001, "b": 0.003})
            advance(1)
    emitter.warning("group size 32 chosen")
    text = buffer.getvalue()
    assert "loading [tiny] model" in text  # markup-like text printed as it is
    assert "quantize (rtn w4)" in text and "2/2" in text
    assert "mean error 0.002, model.layers.1 (2/2) 0.50 s" in text
    assert "warning: group size 32 chosen" in text
