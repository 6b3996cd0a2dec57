"""``openpto.agents``: deterministic agent runs on the Agents SDK's own scripted test model.

The model is the SDK's ``agents.testing.ScriptedModel``; everything else is real: the SDK's
runner and SQLite session, the tools calling the library on a tiny random Llama saved as a
folder, a real ``opt.db``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytest.importorskip("agents")

from agents.testing import (
    ModelCall,
    ModelStep,
    ScriptedModel,
    assistant_message,
    function_call,
)

from openpto.agents import history
from openpto.agents.runner import (
    AgentSettings,
    TextDelta,
    ToolCalled,
    ToolFinished,
    run_agent,
)
from openpto.agents.tools import build_tools
from openpto.errors import UsageError
from openpto.store import Store


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import tiny_llama, tiny_tokenizer

    folder = tmp_path_factory.mktemp("agent") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("agent-text") / "text.txt"
    path.write_text("\n".join(list(topics.values())[40:60]))
    return path


class Recorder:
    """Collects the events and answers confirmations as told."""

    def __init__(self, approve: bool = True) -> None:
        self.events: list[Any] = []
        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.approve = approve

    def __call__(self, event: Any) -> None:
        self.events.append(event)

    async def confirm(self, name: str, arguments: dict[str, Any]) -> bool:
        self.asked.append((name, arguments))
        return self.approve

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


def run(prompt: str, model: ScriptedModel, db: Path, recorder: Recorder,
        **settings: Any) -> Any:
    return asyncio.run(run_agent(prompt, AgentSettings(db_path=db, **settings),
                                 confirm=recorder.confirm, on_event=recorder,
                                 sdk_model=model))


def tool_outputs(call: ModelCall) -> dict[str, str]:
    """call_id -> the tool output the model was given in this call's input."""
    return {item["call_id"]: item["output"] for item in call.input
            if isinstance(item, dict) and item.get("type") == "function_call_output"}


def answer_from_tool(call: ModelCall) -> Any:
    """A scripted final answer built from what the tool returned (so the test sees that the
    result was fed back)."""
    (output,) = tool_outputs(call).values()
    return [assistant_message(f"The tool said: {output[:120]}")]


# -- tool schemas from the registered configs ----------------------------------------------------


def test_tool_schemas_come_from_the_registered_configs() -> None:
    import openpto

    tools = {t.name: t for t in build_tools()}
    assert set(tools) == {"machine_info", "list_models", "list_artifacts", "evaluate",
                          "quantize", "sparsify", "export", "profile", "bench",
                          "query_database", "show_run"}
    quant = tools["quantize"].parameters["properties"]
    names = {c["name"] for c in openpto.configs() if c["kind"] == "quantization"}
    assert set(quant["method"]["enum"]) == names and {"gptq", "awq", "rtn"} <= names
    fields = quant["config"]["properties"]
    assert fields["bits"]["type"] == "integer"
    assert fields["group_size"]["type"] == ["integer", "string", "null"]
    assert fields["damp"]["type"] == "number" and "[gptq only]" in fields["damp"]["description"]
    assert "Hessian" in fields["damp"]["description"] or "Cholesky" in fields["damp"]["description"]
    sparse = tools["sparsify"].parameters["properties"]
    assert {"magnitude", "wanda", "sparsegpt"} <= set(sparse["method"]["enum"])
    assert sparse["config"]["properties"]["pattern"]["type"] == ["string", "null"]
    assert set(tools["export"].parameters["properties"]["format"]["enum"]) == {
        "gguf", "compressed-tensors", "mlx"}
    assert [t.name for t in tools.values() if t.confirm] == ["quantize", "sparsify", "export",
                                                              "bench"]


def test_a_method_a_plugin_registers_appears_in_the_schema() -> None:
    """A config registered at test time through the real plugin manager is in the quantize
    tool's schema (method and its own field), with nothing in the agent changed."""
    from openpto.config import _CONFIG_TYPES, option
    from openpto.core.quant import QuantConfig
    from openpto.hookspecs import hookimpl
    from tests.helpers import registered_plugin

    @dataclass(frozen=True)
    class ShiftConfig(QuantConfig):
        """Shift quantization: a test-only method that rounds to powers of two."""

        type_name: ClassVar[str] = "shift-test"
        shift: int = option(3, "bits the grid is shifted by")

    def shift_transform(model: Any, config: Any, calibration: Any = None, **kw: Any) -> Any:
        raise NotImplementedError("the schema is what is tested here")

    class ShiftPlugin:
        @hookimpl
        def register_methods(self, register: Any) -> None:
            register(ShiftConfig, shift_transform)

    try:
        with registered_plugin(ShiftPlugin(), "shift-plugin"):
            quant = {t.name: t for t in build_tools()}["quantize"].parameters["properties"]
            assert "shift-test" in quant["method"]["enum"]
            assert "Shift quantization" in quant["method"]["description"]
            shift = quant["config"]["properties"]["shift"]
            assert shift == {"type": "integer", "description":
                             "bits the grid is shifted by (default 3) [shift-test only]"}
    finally:
        _CONFIG_TYPES.pop("shift-test", None)  # the class registered itself on definition
    quant = {t.name: t for t in build_tools()}["quantize"].parameters["properties"]
    assert "shift-test" not in quant["method"]["enum"]
    assert "shift" not in quant["config"]["properties"]


# -- scripted flows ------------------------------------------------------------------------------


def test_the_right_tool_runs_the_library_and_its_result_is_fed_back(
        tiny_folder: Path, text_file: Path, tmp_db: Path) -> None:
    arguments = {"model": str(tiny_folder), "text": str(text_file), "seq_len": 32,
                 "max_tokens": 256}
    model = ScriptedModel([[function_call("evaluate", arguments, call_id="call-1")],
                           ModelStep.respond(answer_from_tool)])
    recorder = Recorder()
    result = run("What is the perplexity of my tiny model?", model, tmp_db, recorder)

    model.assert_complete()
    assert [e.name for e in recorder.of(ToolCalled)] == ["evaluate"]
    assert recorder.of(ToolCalled)[0].arguments == arguments
    (finished,) = recorder.of(ToolFinished)
    assert finished.ok and finished.call_id == "call-1"
    measured = json.loads(finished.output)
    # The number the tool returned is the one the eval run recorded in the same database.
    store = Store(tmp_db)
    (eval_run,) = store.rows("runs", "kind = 'eval'")
    (ppl,) = store.rows("metrics", "run_id = ? AND name = 'perplexity'", [eval_run["id"]])
    assert measured["perplexity"] == pytest.approx(ppl["value"], rel=1e-12)
    assert measured["run_id"] == eval_run["id"] and measured["seq_len"] == 32
    # The tool's output reached the model's next call, and its answer is the run's output.
    assert tool_outputs(model.calls[1]) == {"call-1": finished.output}
    assert result.output == f"The tool said: {finished.output[:120]}"
    assert "".join(e.text for e in recorder.of(TextDelta)) == result.output
    assert result.tool_calls == [{"name": "evaluate", "arguments": arguments, "ok": True}]
    # The agent run, its tool-call trace and the exchange are recorded.
    (agent_run,) = store.rows("runs", "kind = 'agent'")
    assert agent_run["id"] == result.run_id and agent_run["status"] == "succeeded"
    (trace,) = store.rows("traces", "run_id = ?", [result.run_id])
    assert trace["name"] == "tool evaluate" and json.loads(trace["attributes"])["ok"] is True
    (prompt,) = store.rows("prompts")
    assert (prompt["source"], prompt["run_id"], prompt["conversation_id"]) == (
        "agent", result.run_id, result.session)
    assert prompt["prompt"] == "What is the perplexity of my tiny model?"
    assert prompt["response"] == result.output


def test_a_refused_confirmation_runs_nothing(tiny_folder: Path, tmp_db: Path,
                                             tmp_path: Path) -> None:
    output = tmp_path / "never-written"
    arguments = {"model": str(tiny_folder), "method": "rtn", "config": {"bits": 8},
                 "output": str(output)}
    model = ScriptedModel([[function_call("quantize", arguments, call_id="q1")],
                           ModelStep.respond(answer_from_tool)])
    recorder = Recorder(approve=False)
    result = run("Quantize my tiny model to 8 bits", model, tmp_db, recorder)

    assert recorder.asked == [("quantize", arguments)]
    (finished,) = recorder.of(ToolFinished)
    assert not finished.ok and "declined" in finished.output
    assert "declined" in tool_outputs(model.calls[1])["q1"]
    assert not output.exists()
    assert Store(tmp_db).rows("runs", "kind = 'quantize'") == []
    assert result.tool_calls == [{"name": "quantize", "arguments": arguments, "ok": False}]


def test_yes_runs_a_writing_tool_without_asking(tiny_folder: Path, tmp_db: Path,
                                                tmp_path: Path) -> None:
    output = tmp_path / "tiny-rtn8"
    arguments = {"model": str(tiny_folder), "method": "rtn", "config": {"bits": 8},
                 "output": str(output)}
    model = ScriptedModel([[function_call("quantize", arguments, call_id="q1")],
                           ModelStep.respond(answer_from_tool)])
    recorder = Recorder(approve=False)
    run("Quantize my tiny model to 8 bits", model, tmp_db, recorder, yes=True)

    assert recorder.asked == []
    (finished,) = recorder.of(ToolFinished)
    assert finished.ok, finished.output
    done = json.loads(finished.output)
    assert (done["method"], done["bits"], done["output"]) == ("rtn", 8, str(output))
    assert (output / "openpto.json").is_file()
    (quant_run,) = Store(tmp_db).rows("runs", "kind = 'quantize'")
    assert quant_run["id"] == done["run_id"] and quant_run["status"] == "succeeded"


def test_tool_errors_are_reported_to_the_model_not_a_crash(tmp_db: Path) -> None:
    model = ScriptedModel([
        [function_call("evaluate", {"model": "/no/such/model"}, call_id="e1"),
         function_call("quantize", {"method": "no-such-method"}, call_id="e2"),
         function_call("query_database", "{not json", call_id="e3"),
         function_call("quantize", {"method": "rtn", "config": {"bits": "eight"}},
                       call_id="e4")],
        [assistant_message("Those failed.")],
    ])
    recorder = Recorder()
    result = run("try things", model, tmp_db, recorder, yes=True)

    outputs = tool_outputs(model.calls[1])
    assert "/no/such/model" in outputs["e1"] and outputs["e1"].startswith("error: ")
    assert "method" in outputs["e2"] and "no-such-method" in outputs["e2"]
    assert "not valid JSON" in outputs["e3"]
    assert "bits" in outputs["e4"] and outputs["e4"].startswith("error: ")
    assert all(not e.ok for e in recorder.of(ToolFinished))
    assert result.output == "Those failed."
    assert [c["ok"] for c in result.tool_calls] == [False] * 4
    (agent_run,) = Store(tmp_db).rows("runs", "kind = 'agent'")
    assert agent_run["status"] == "succeeded"
    assert Store(tmp_db).rows("runs", "kind = 'quantize'") == []


def test_no_tool_reaches_a_shell_deletes_files_or_writes_the_database(tmp_db: Path) -> None:
    names = {t.name for t in build_tools()}
    assert not names & {"shell", "run_shell", "bash", "exec", "delete", "delete_file", "rm",
                        "write_file", "execute_sql"}
    Store(tmp_db).insert("runs", {"id": "keep-me", "kind": "eval", "status": "succeeded"})
    writes = ["DELETE FROM runs", "DROP TABLE runs", "UPDATE runs SET status = 'failed'",
              "WITH doomed AS (SELECT id FROM runs) DELETE FROM runs WHERE id IN doomed",
              "SELECT 1; DELETE FROM runs", "ATTACH DATABASE 'x.db' AS x",
              "/* a comment */ INSERT INTO runs (id) VALUES ('x')", "PRAGMA query_only = OFF"]
    calls = [function_call("query_database", {"sql": sql}, call_id=f"w{i}")
             for i, sql in enumerate(writes)]
    calls.append(function_call("run_shell", {"command": "rm -rf /"}, call_id="shell"))
    model = ScriptedModel([calls, [assistant_message("I cannot do that.")]])
    recorder = Recorder()
    run("Delete every run and wipe my disk", model, tmp_db, recorder)

    outputs = tool_outputs(model.calls[1])
    assert outputs["shell"] == "Tool 'run_shell' not found."
    for i, sql in enumerate(writes):
        assert outputs[f"w{i}"].startswith("error: "), (sql, outputs[f"w{i}"])
    assert "read-only" in outputs["w3"]  # got past the statement check: the connection refused
    assert [r["id"] for r in Store(tmp_db).rows("runs", "kind = 'eval'")] == ["keep-me"]
    assert all(not e.ok for e in recorder.of(ToolFinished))


def test_the_database_tool_reads(tmp_db: Path) -> None:
    Store(tmp_db).insert("runs", {"id": "r1", "kind": "eval", "status": "succeeded",
                                  "model": "m"})
    sql = "SELECT id, kind FROM runs WHERE kind = 'eval'"
    model = ScriptedModel([[function_call("query_database", {"sql": sql}, call_id="q"),
                            function_call("show_run", {"run_id": "r1"}, call_id="s")],
                           [assistant_message("ok")]])
    run("what ran?", model, tmp_db, Recorder())
    outputs = tool_outputs(model.calls[1])
    assert json.loads(outputs["q"]) == {"rows": [{"id": "r1", "kind": "eval"}], "count": 1,
                                        "limited_to": None}
    shown = json.loads(outputs["s"])
    assert shown["run"]["id"] == "r1" and shown["metrics"] == [] and shown["stages"] == []


def test_a_session_persists_and_resumes(tmp_db: Path) -> None:
    first = ScriptedModel([[assistant_message("Noted: your favourite bit width is 4.")]])
    run("Remember: my favourite bit width is 4.", first, tmp_db, Recorder(), session="bits")

    def recalls(call: ModelCall) -> Any:
        texts = json.dumps(call.input)
        assert "my favourite bit width is 4" in texts and "Noted: your favourite" in texts
        return [assistant_message("It is 4.")]

    second = ScriptedModel([ModelStep.respond(recalls)])
    result = run("What is my favourite bit width?", second, tmp_db, Recorder(), session="bits")
    second.assert_complete()
    assert result.output == "It is 4." and result.session == "bits"

    (listed,) = history.list_sessions(tmp_db)
    assert (listed["session"], listed["exchanges"], listed["messages"]) == ("bits", 2, 4)
    assert listed["last_prompt"] == "What is my favourite bit width?"
    messages = history.session_messages("bits", tmp_db)
    assert [(m["role"], m["text"]) for m in messages] == [
        ("user", "Remember: my favourite bit width is 4."),
        ("assistant", "Noted: your favourite bit width is 4."),
        ("user", "What is my favourite bit width?"),
        ("assistant", "It is 4."),
    ]
    with pytest.raises(UsageError, match=r"no agent session .nope.*bits"):
        history.session_messages("nope", tmp_db)


def test_datasette_canned_queries_for_prompts_and_sessions(tmp_db: Path) -> None:
    """The canned queries of datasette_metadata.json run on a database an agent wrote."""
    import importlib.resources

    model = ScriptedModel([[function_call("list_artifacts", {}, call_id="a")],
                           [assistant_message("none")]])
    result = run("list my artifacts", model, tmp_db, Recorder(), session="canned")
    metadata = json.loads(importlib.resources.files("openpto.store")
                          .joinpath("datasette_metadata.json").read_text())
    queries = metadata["databases"]["opt"]["queries"]
    conn = sqlite3.connect(tmp_db)
    conn.row_factory = sqlite3.Row

    def rows(name: str, **params: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in conn.execute(queries[name]["sql"], params)]

    (prompt,) = rows("prompts_by_source", source="agent")
    assert (prompt["prompt"], prompt["response"], prompt["run_id"]) == (
        "list my artifacts", "none", result.run_id)
    assert rows("prompts_by_source", source="server") == []
    (session,) = rows("agent_sessions")
    assert (session["session_id"], session["exchanges"], session["messages"]) == ("canned", 1, 4)
    kinds = [(m["role"], m["kind"], m["tool"]) for m in rows("agent_session_messages",
                                                             session="canned")]
    assert kinds == [("user", "message", None), ("assistant", "function_call", "list_artifacts"),
                     ("tool", "function_call_output", None), ("assistant", "message", None)]
    (call,) = rows("agent_tool_calls")
    assert (call["tool"], call["ok"], call["run_id"]) == ("list_artifacts", 1, result.run_id)


def test_a_forced_tool_runs_first_then_the_model_answers_without_tools(tmp_db: Path) -> None:
    def answers(call: ModelCall) -> Any:
        assert call.tools == []  # withdrawn: the answer comes from the result
        return [assistant_message(f"Artifacts: {tool_outputs(call)['f']}")]

    model = ScriptedModel([[function_call("list_artifacts", {}, call_id="f")],
                           ModelStep.respond(answers)])
    result = run("what do I have?", model, tmp_db, Recorder(), tool_choice="list_artifacts")
    model.assert_complete()
    assert model.calls[0].model_settings.tool_choice == "list_artifacts"
    assert len(model.calls[0].tools) == len(build_tools())
    assert result.output == 'Artifacts: {"artifacts": []}'


def test_max_turns_ends_the_run_with_a_clear_error(tmp_db: Path) -> None:
    from openpto.errors import AgentError

    model = ScriptedModel([[function_call("list_artifacts", {}, call_id=f"a{i}")]
                           for i in range(3)])
    with pytest.raises(AgentError, match="within 2 turns"):
        run("loop", model, tmp_db, Recorder(), max_turns=2)
    (agent_run,) = Store(tmp_db).rows("runs", "kind = 'agent'")
    assert agent_run["status"] == "failed" and "within 2 turns" in agent_run["error"]


def test_a_library_call_runs_in_a_worker_thread_so_the_loop_keeps_going(tmp_db: Path) -> None:
    """While a tool's library call is blocked, the event loop still runs other work (the
    stream): the call is on a worker thread, not on the loop."""
    import threading

    from openpto.agents.runner import _ToolGate
    from openpto.agents.tools import ToolEnv, ToolSpec, object_schema
    from openpto.store import RunRecorder

    release = threading.Event()
    threads: list[str] = []

    def blocking(args: dict[str, Any], env: ToolEnv) -> Any:
        threads.append(threading.current_thread().name)
        if not release.wait(timeout=60):
            raise RuntimeError("never released")
        return {"done": True}

    async def scenario() -> str:
        recorder = RunRecorder(Store(tmp_db), "agent", "m")
        recorder.start()
        gate = _ToolGate(ToolEnv(tmp_db), True, Recorder().confirm, recorder)
        spec = ToolSpec("slow", "blocks", object_schema({}), blocking)
        task = asyncio.create_task(gate.call(spec, "c1", "{}"))
        ticks = 0
        while not threads:  # the loop keeps turning while the tool has started and is blocked
            await asyncio.sleep(0.01)
        for _ in range(5):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and not task.done()
        release.set()
        return await task

    assert json.loads(asyncio.run(scenario())) == {"done": True}
    assert threads and threads[0] != threading.main_thread().name


def test_importing_the_runner_is_cheap() -> None:
    """The TUI imports the runner for its dataclasses: no SDK, torch or server until a run."""
    import subprocess
    import sys

    code = ("import sys, openpto.agents.runner, openpto.agents.history; "
            "heavy = {'agents', 'torch', 'openai', 'fastapi', 'transformers'} & set(sys.modules);"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_endpoint_comes_from_the_flags_then_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.models.default_models import get_default_model

    from openpto.agents.endpoint import OPENAI_URL, Endpoint, external
    from openpto.agents.runner import tracing_allowed

    key = "sk-test-endpoint-0c4e9a"
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    assert external(None, None) is None  # nothing set: the built-in server
    monkeypatch.setenv("OPENAI_API_KEY", key)
    openai_ep = external(None, None)
    assert openai_ep is not None
    assert (openai_ep.base_url, openai_ep.model, openai_ep.api_key) == (
        OPENAI_URL, get_default_model(), key)
    assert openai_ep.is_openai and key not in repr(openai_ep)
    assert key not in json.dumps(openai_ep.describe())
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    assert external(None, "m") == Endpoint("http://127.0.0.1:9/v1", "m", key)
    assert external("http://other:8000/v1", "m").base_url == "http://other:8000/v1"
    other = external(None, "m")
    assert other is not None and not other.is_openai

    assert tracing_allowed(openai_ep, True)
    assert not tracing_allowed(openai_ep, False)
    assert not tracing_allowed(other, True)  # never to a non-OpenAI endpoint
    assert not tracing_allowed(None, True)


def test_tracing_is_off_for_a_run_that_may_not_trace(tmp_db: Path) -> None:
    from agents.tracing import trace
    from agents.tracing.traces import NoOpTrace

    model = ScriptedModel([[assistant_message("hi")]])
    run("hello", model, tmp_db, Recorder(), trace=True)
    with trace("probe") as probe:
        assert isinstance(probe, NoOpTrace)
    (agent_run,) = Store(tmp_db).rows("runs", "kind = 'agent'")
    assert json.loads(agent_run["config"])["trace"] is False


def test_field_types_map_onto_json_schema() -> None:
    from openpto.agents.schema import field_schema

    assert field_schema("int") == {"type": "integer"}
    assert field_schema("float | None", "a ratio", 0.5) == {
        "type": ["number", "null"], "description": "a ratio (default 0.5)"}
    assert field_schema("'compressed' | 'dense'") == {"enum": ["compressed", "dense"]}
    assert field_schema("tuple[str, ...]")["type"] == "array"
    # A type no JSON value can be (EvalConfig.text also takes a TextSource) leaves the union.
    assert field_schema("str | TextSource | None")["type"] == ["string", "null"]
    assert field_schema("Callable") == {}


def test_the_read_only_tools_answer_from_the_library(tiny_folder: Path, tmp_db: Path) -> None:
    """machine_info, list_models and a sparsify dry run (asked about, as every sparsify call
    is, and approved) through the scripted model."""
    model = ScriptedModel([
        [function_call("machine_info", {}, call_id="i"),
         function_call("list_models", {}, call_id="m"),
         function_call("sparsify", {"model": str(tiny_folder), "method": "magnitude",
                                    "config": {"sparsity": 0.5}, "dry_run": True},
                       call_id="s")],
        [assistant_message("done")]])
    recorder = Recorder(approve=True)
    run("tell me about this machine and prune my model", model, tmp_db, recorder)
    outputs = {k: json.loads(v) for k, v in tool_outputs(model.calls[1]).items()}
    import torch

    assert outputs["i"]["torch"] == torch.__version__
    assert "torch" in outputs["i"]["quantization_backends"]
    assert outputs["m"]["default"] == "smollm2-135m"
    assert [a["name"] for a in outputs["m"]["aliases"]] == ["smollm2-135m"]
    planned = outputs["s"]
    assert planned["dry_run"] is True and planned["method"] == "magnitude"
    assert planned["sparsity"] == pytest.approx(0.5)
    assert not Path(planned["output"]).exists()
    assert recorder.asked == [("sparsify", {"model": str(tiny_folder), "method": "magnitude",
                                            "config": {"sparsity": 0.5}, "dry_run": True})]
