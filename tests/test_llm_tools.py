"""Tools through the llm plugin (in-process, llm's own Model API): the tools and a tool round
trip reach the prompt exactly as engines.tool_calls renders them, and <tool_call> blocks in a
streamed reply become llm tool calls, held back from the text."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

llm = pytest.importorskip("llm")

from tests.test_llm_plugin import artifact  # noqa: E402, F401  (a module fixture)


def weather(city: str) -> str:
    """The current weather in a city."""
    return f"18C in {city}"


def _last_prompt(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        (config,) = conn.execute("SELECT config FROM runs WHERE kind = 'generate' "
                                 "ORDER BY started_at DESC LIMIT 1").fetchone()
    return str(json.loads(config)["prompt"])


def test_tools_and_a_tool_round_trip_reach_the_prompt(artifact: tuple[Path, Path],  # noqa: F811
                                                     tmp_db: Path) -> None:
    from llm.parts import Message, TextPart, ToolCallPart, ToolResultPart

    from openpto.engines.tool_calls import chat_prompt
    from openpto.integrations.llm_plugin import OptModel, prompt_tools
    from openpto.models import load_model

    folder = artifact[0]
    model = OptModel("opt/tiny-w8", str(folder))
    tokenizer = load_model(str(folder)).tokenizer

    response = model.prompt("Weather in Paris?", tools=[weather], max_tokens=4)
    response.text()
    tools = prompt_tools(response.prompt)
    assert [(t.name, t.description, dict(t.parameters)) for t in tools] == [
        ("weather", "The current weather in a city.",
         {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})]
    want = chat_prompt(tokenizer, [{"role": "user", "content": "Weather in Paris?"}], tools)
    assert _last_prompt(tmp_db) == want
    assert "<tool_call>" in want and '"weather"' in want  # the tools system block

    history = [
        Message(role="user", parts=[TextPart(text="Weather in Paris?")]),
        Message(role="assistant", parts=[ToolCallPart(name="weather",
                                                      arguments={"city": "Paris"},
                                                      tool_call_id="call_1")]),
        Message(role="tool", parts=[ToolResultPart(name="weather", output="18C in Paris",
                                                   tool_call_id="call_1")]),
    ]
    model.prompt(None, messages=history, tools=[weather], max_tokens=4).text()
    want = chat_prompt(tokenizer, [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "weather",
         "content": "18C in Paris"}], tools)
    assert _last_prompt(tmp_db) == want
    assert '<tool_response>{"name": "weather", "content": "18C in Paris"}' in want


def test_tool_call_blocks_become_llm_tool_calls() -> None:
    from openpto.engines.tool_calls import parse_tools
    from openpto.integrations.llm_plugin import ReplySplitter

    tools = parse_tools([{"type": "function", "function": {
        "name": "weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}])
    splitter = ReplySplitter(tools)
    chunks = ["Let me check. <tool", "_call>{\"name\": \"weather\", ",
              "\"arguments\": {\"city\": \"Paris\"}}</tool_call>"]
    shown = "".join(splitter.push(c) for c in chunks)
    rest, calls = splitter.finish()
    assert shown == "Let me check. " and rest == ""
    assert [(c.name, c.arguments) for c in calls] == [("weather", {"city": "Paris"})]
    assert calls[0].tool_call_id and calls[0].tool_call_id.startswith("call_")

    splitter = ReplySplitter(tools)
    bad = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    shown = splitter.push("Hmm " + bad)
    rest, calls = splitter.finish()
    assert calls == [] and shown + rest == "Hmm " + bad  # kept as the model wrote it

    plain = ReplySplitter([])
    assert plain.push("a <tool_call>") == "a <tool_call>" and plain.finish() == ("", [])
