"""``opt agent`` end to end against a scripted OpenAI-compatible endpoint on loopback.

The endpoint is a real HTTP server (pytest-httpserver) answering ``/v1/chat/completions`` with
streamed chunks from a script, so the SDK's real chat-completions model, the official ``openai``
client and the CLI run as they do against any endpoint; it also records what each request
carried (the Authorization header, the tools).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("agents")
pytest_httpserver = pytest.importorskip("pytest_httpserver")

from werkzeug import Request, Response  # noqa: E402

from openpto.store import Store  # noqa: E402
from tests.helpers import run_opt  # noqa: E402

SECRET = "sk-test-9f3c7e1ad0b24c58b6e1"


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
            "model": "scripted", "choices": [{"index": 0, "delta": delta,
                                              "finish_reason": finish}]}


def text_reply(*pieces: str) -> list[dict[str, Any]]:
    first, *rest = pieces
    return ([chunk({"role": "assistant", "content": first})]
            + [chunk({"content": p}) for p in rest] + [chunk({}, "stop")])


def tool_reply(name: str, arguments: dict[str, Any], call_id: str = "call_1") -> list[Any]:
    call = {"index": 0, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}
    return [chunk({"role": "assistant", "tool_calls": [call]}), chunk({}, "tool_calls")]


class ScriptedEndpoint:
    """Answers each chat request with the next scripted reply, streamed as SSE."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.replies: list[list[dict[str, Any]]] = []
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        server.expect_request("/v1/chat/completions", method="POST").respond_with_handler(
            self.chat)
        server.expect_request("/v1/models", method="GET").respond_with_json(
            {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})

    @property
    def url(self) -> str:
        return self.server.url_for("/v1")

    def chat(self, request: Request) -> Response:
        self.requests.append(json.loads(request.get_data()))
        self.auth.append(request.headers.get("Authorization"))
        if not self.replies:
            return Response(json.dumps({"error": {"message": "script exhausted"}}), status=500)
        chunks = self.replies.pop(0)
        if (self.requests[-1].get("stream_options") or {}).get("include_usage"):
            chunks = [*chunks, {**chunk({}), "choices": [], "usage": {
                "prompt_tokens": 100 + len(self.requests), "completion_tokens": 7,
                "total_tokens": 107 + len(self.requests)}}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks)
        return Response(body + "data: [DONE]\n\n", content_type="text/event-stream")


@pytest.fixture
def endpoint(httpserver: Any, monkeypatch: pytest.MonkeyPatch) -> ScriptedEndpoint:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return ScriptedEndpoint(httpserver)


def database_text(db: Path) -> str:
    """Every byte of the database and its WAL, as text (for searching)."""
    return "".join(p.read_bytes().decode("latin-1") for p in db.parent.glob(db.name + "*"))


def test_json_prints_the_answer_the_tool_calls_session_and_run(
        endpoint: ScriptedEndpoint, tmp_db: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint.replies = [tool_reply("list_artifacts", {}),
                        text_reply("You have ", "no artifacts ", "yet.")]
    code, out, err = run_opt(["agent", "--base-url", endpoint.url, "--model", "scripted",
                              "--session", "cli", "--tool-choice", "list_artifacts", "--json",
                              "What artifacts do I have?"],
                             capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["output"] == "You have no artifacts yet."
    assert result["tool_calls"] == [{"name": "list_artifacts", "arguments": {}, "ok": True}]
    assert result["session"] == "cli"
    (run,) = Store(tmp_db).rows("runs", "kind = 'agent'")
    assert run["id"] == result["run_id"] and run["status"] == "succeeded"
    assert run["model"] == "scripted"
    # The exchange's prompts row adds up the token counts both streamed replies ended with.
    (prompt,) = Store(tmp_db).rows("prompts")
    assert (prompt["tokens_in"], prompt["tokens_out"]) == (101 + 102, 7 + 7)
    assert prompt["response"] == result["output"] and prompt["run_id"] == result["run_id"]
    # The tools went out in the request; the tool's result came back in the second one.
    assert {t["function"]["name"] for t in endpoint.requests[0]["tools"]} >= {
        "list_artifacts", "quantize", "query_database"}
    assert endpoint.requests[0]["stream"] is True
    # The forced call comes first; then the model answers from its result.
    assert endpoint.requests[0]["tool_choice"] == {"type": "function",
                                                   "function": {"name": "list_artifacts"}}
    assert endpoint.requests[1].get("tool_choice") in (None, "auto")
    assert not endpoint.requests[1].get("tools")  # withdrawn after the forced call
    tool_message = endpoint.requests[1]["messages"][-1]
    assert tool_message["role"] == "tool" and json.loads(tool_message["content"]) == {
        "artifacts": []}
    # The tool calls and the text went to stderr, nothing but the object to stdout.
    assert "list_artifacts" in err and "You have no artifacts yet." in err
    assert out.count("\n") == 1


def test_calls_over_several_turns_are_all_listed_and_reused_ids_refused(
        endpoint: ScriptedEndpoint, tmp_db: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint.replies = [tool_reply("list_models", {}, "call_1"),
                        tool_reply("show_run", {"run_id": "x"}, "call_2"),
                        text_reply("Two calls.")]
    code, out, err = run_opt(["agent", "--base-url", endpoint.url, "--model", "m", "--json",
                              "look around"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["tool_calls"] == [
        {"name": "list_models", "arguments": {}, "ok": True},
        {"name": "show_run", "arguments": {"run_id": "x"}, "ok": False}]
    # An endpoint that gives a second call the id of a finished one: one clear line.
    endpoint.replies = [tool_reply("list_models", {}, "call_1"),
                        tool_reply("show_run", {"run_id": "x"}, "call_1")]
    code, out, err = run_opt(["agent", "--base-url", endpoint.url, "--model", "m", "--json",
                              "look around"], capsys, monkeypatch)
    assert code == 1 and out == ""
    assert "error: the agent could not go on: Model reused a completed tool call ID" in err


def test_tools_and_max_tokens_narrow_the_request(
        endpoint: ScriptedEndpoint, tmp_db: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint.replies = [text_reply("Fine.")]
    code, _, err = run_opt(["agent", "--base-url", endpoint.url, "--model", "m", "--tools",
                              "list_artifacts, show_run", "--max-tokens", "40", "hi"], capsys,
                             monkeypatch)
    assert code == 0, err
    (request,) = endpoint.requests
    assert [t["function"]["name"] for t in request["tools"]] == ["list_artifacts", "show_run"]
    assert request.get("max_tokens", request.get("max_completion_tokens")) == 40
    code, _, err = run_opt(["agent", "--base-url", endpoint.url, "--model", "m", "--tools",
                            "list_artifacts,rm", "hi"], capsys, monkeypatch)
    assert code == 2 and "--tools: rm (tools: machine_info" in err
    assert len(endpoint.requests) == 1


def test_the_key_is_used_but_never_printed_stored_or_traced(
        endpoint: ScriptedEndpoint, tmp_db: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint.replies = [tool_reply("query_database", {"sql": "SELECT kind FROM runs"}),
                        text_reply("Done.")]
    code, out, err = run_opt(["agent", "--base-url", endpoint.url, "--trace", "--yes",
                              "--session", "keyed", "show my runs"], capsys, monkeypatch)
    assert code == 0, err
    assert endpoint.auth == [f"Bearer {SECRET}"] * 2  # it was read from the environment
    assert SECRET not in out and SECRET not in err
    assert SECRET not in database_text(tmp_db)
    store = Store(tmp_db)
    for table in ("runs", "traces", "prompts", "agent_sessions", "agent_messages"):
        assert SECRET not in json.dumps(store.rows(table), default=str), table
    (run,) = store.rows("runs", "kind = 'agent'")
    config = json.loads(run["config"])
    # No --model: the endpoint's first listed model; --trace refused for a non-OpenAI endpoint.
    assert config["endpoint"] == {"base_url": endpoint.url, "model": "scripted-model",
                                  "builtin": False, "key_from_environment": True}
    assert config["trace"] is False
    assert run["model"] == "scripted-model"


def test_streamed_text_and_tool_lines_in_order(
        endpoint: ScriptedEndpoint, tmp_db: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint.replies = [tool_reply("show_run", {"run_id": "no-such-run"}),
                        text_reply("That run ", "does not exist.")]
    code, out, err = run_opt(["agent", "--base-url", endpoint.url, "--model", "m",
                              "which run is no-such-run?"], capsys, monkeypatch)
    assert code == 0, err
    call = out.index("→ show_run")
    failed = out.index("✗ show_run: error: no run 'no-such-run'")
    answer = out.index("That run does not exist.")
    assert call < failed < answer
    assert "session agent-" in err


def test_a_declined_confirmation_on_stdin_runs_nothing(
        endpoint: ScriptedEndpoint, tmp_db: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.gguf"
    endpoint.replies = [tool_reply("export", {"artifact": str(tmp_path), "format": "gguf",
                                              "output": str(target)}),
                        text_reply("Not exported.")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, out, err = run_opt(["agent", "--base-url", endpoint.url, "--model", "m", "--json",
                              "export it"], capsys, monkeypatch)
    assert code == 0, err
    assert "wants to run export" in err and "Run it? [y/N]" in err
    result = json.loads(out)
    assert result["tool_calls"][0]["ok"] is False
    assert "declined" in endpoint.requests[1]["messages"][-1]["content"]
    assert not target.exists() and Store(tmp_db).rows("runs", "kind = 'export'") == []


def test_interactive_session_from_piped_stdin_and_history(
        endpoint: ScriptedEndpoint, tmp_db: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint.replies = [text_reply("Hello."), tool_reply("list_models", {}),
                        text_reply("The default is smollm2-135m.")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n\nwhich models can I use?\nexit\n"))
    code, out, err = run_opt(["agent", "--base-url", endpoint.url, "--model", "m",
                              "--session", "chat", "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert [e["output"] for e in result["exchanges"]] == ["Hello.",
                                                         "The default is smollm2-135m."]
    assert result["session"] == "chat" and result["output"] == "The default is smollm2-135m."
    assert result["tool_calls"] == [{"name": "list_models", "arguments": {}, "ok": True}]
    # The second exchange carried the first one: one conversation.
    second = endpoint.requests[1]["messages"]
    assert [m["content"] for m in second if m["role"] == "user"] == [
        "hi", "which models can I use?"]

    code, out, err = run_opt(["agent", "history", "--json"], capsys, monkeypatch)
    assert code == 0, err
    (listed,) = json.loads(out)["sessions"]
    assert (listed["session"], listed["exchanges"]) == ("chat", 2)
    code, out, err = run_opt(["agent", "history", "chat", "--json"], capsys, monkeypatch)
    assert code == 0, err
    messages = json.loads(out)["messages"]
    assert [m["kind"] for m in messages] == ["message", "message", "message", "tool_call",
                                             "tool_result", "message"]
    assert messages[3]["name"] == "list_models"
    code, out, err = run_opt(["agent", "history"], capsys, monkeypatch)
    assert code == 0 and "agent sessions" in out and "chat" in out
    code, out, err = run_opt(["agent", "history", "chat"], capsys, monkeypatch)
    assert code == 0 and "list_models({})" in out and "The default is smollm2-135m." in out
    code, out, err = run_opt(["agent", "history", "nope"], capsys, monkeypatch)
    assert code == 2 and "no agent session 'nope'" in err and "chat" in err


def test_an_unreachable_endpoint_is_one_clear_error(
        tmp_db: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from openpto.serving.background import free_port

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, out, err = run_opt(["agent", "--base-url", url, "--model", "m", "hello"], capsys,
                             monkeypatch)
    assert code == 1 and out == ""
    assert err.startswith("error: cannot reach the model endpoint") and "Traceback" not in err
    assert SECRET not in err
    (run,) = Store(tmp_db).rows("runs", "kind = 'agent'")
    assert run["status"] == "failed" and SECRET not in run["error"]


def test_bad_flags_are_usage_errors(tmp_db: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_opt(["agent", "--base-url", "ftp://x", "--model", "m", "hi"], capsys,
                           monkeypatch)
    assert code == 2 and "--base-url must be an http(s) URL" in err
    code, _, err = run_opt(["agent", "--max-turns", "0", "hi"], capsys, monkeypatch)
    assert code == 2 and "max-turns" in err
    code, _, err = run_opt(["agent", "--tool-choice", "run_shell", "hi"], capsys, monkeypatch)
    assert code == 2 and "--tool-choice 'run_shell' is none of: auto, required" in err
    assert Store(tmp_db).rows("runs", "kind = 'agent'") == []
    code, out, _ = run_opt(["agent", "--help"], capsys, monkeypatch)
    assert code == 0 and "Example: opt agent" in out and "history" in out
