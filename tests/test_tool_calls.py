"""Tool calls without HTTP: prompt rendering, reply parsing, streaming hold-back, and grammar
masks on a tiny random model (the default model's tokenizer for rendering)."""

from __future__ import annotations

import json

import pytest
import torch
from jsonschema import Draft202012Validator

from openpto.core.generate import generate_text, token_steps
from openpto.core.sampling import SamplingParams
from openpto.engines.tool_calls import (
    ToolCallStream,
    chat_prompt,
    parse_reply,
    parse_tools,
    plain_messages,
    template_renders_tools,
)
from openpto.errors import UsageError
from tests.helpers import one_thread, tiny_tokenizer
from tests.test_serving import TEMPLATE, varied_tiny_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}
LIST = {"type": "function", "function": {"name": "list_models", "description": "Saved models"}}
TOOLS = parse_tools([WEATHER, LIST])


def test_parse_tools_checks_names_and_schemas() -> None:
    assert [t.name for t in TOOLS] == ["get_weather", "list_models"]
    assert TOOLS[1].parameters == {"type": "object", "properties": {}}
    with pytest.raises(UsageError, match="tool 'bad': parameters is not a valid JSON Schema"):
        parse_tools([{"type": "function",
                      "function": {"name": "bad", "parameters": {"type": "nope"}}}])
    with pytest.raises(UsageError, match="defined twice"):
        parse_tools([LIST, LIST])
    with pytest.raises(UsageError, match="needs a name"):
        parse_tools([{"type": "function", "function": {"description": "no name"}}])


def test_parse_reply_calls_and_each_kind_of_failure() -> None:
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}'
            '</tool_call>\n<tool_call>{"name": "list_models", "arguments": {}}</tool_call>')
    parsed = parse_reply(text, TOOLS)
    assert parsed.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Rome"}), ("list_models", {})]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in parsed.tool_calls)
    assert parsed.errors == []
    # Empty or missing arguments come back as "{}".
    assert parse_reply('<tool_call>{"name": "list_models"}</tool_call>',
                       TOOLS).tool_calls[0].arguments == "{}"
    cases = {
        '<tool_call>{"name": "get_weather", "arguments": {city}}</tool_call>': "malformed_json",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>': "unknown_tool",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>':
            "invalid_arguments",
        '<tool_call>{"name": "get_weather", "arguments": {"ci': "unterminated",
    }
    for block, kind in cases.items():
        parsed = parse_reply("Hi " + block, TOOLS)
        assert parsed.tool_calls == [] and [e.kind for e in parsed.errors] == [kind]
        assert parsed.content == "Hi " + block  # nothing the model wrote is lost
        assert parsed.errors[0].text == block and parsed.errors[0].message


def test_stream_holds_back_what_may_open_a_call() -> None:
    stream = ToolCallStream()
    shown = [stream.push(piece) for piece in ["Hel", "lo <", "b> <to", "ol_c", "all>{", "}"]]
    assert shown == ["Hel", "lo ", "<b> ", "", "", ""]
    assert stream.tail == "<tool_call>{}" and stream.finish() == ""
    stream = ToolCallStream()
    assert stream.push("a <tool") == "a " and stream.finish() == "<tool"


def test_plain_messages_render_calls_and_results_in_the_hermes_shape() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
    ]
    out = plain_messages(messages, TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou are a function calling AI model.")
    assert json.dumps(TOOLS[0].to_openai()) in out[0]["content"]
    assert out[2]["content"] == (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    assert out[3]["content"] == (
        '<tool_response>{"name": "get_weather", "content": "22C"}</tool_response>\n'
        '<tool_response>{"name": "get_weather", "content": "25C"}</tool_response>')


def test_templates_with_and_without_tools() -> None:
    from transformers import AutoTokenizer

    from openpto.models.cache import cache_root

    folders = sorted(cache_root().glob("models/smollm2-135m-*"))
    if not folders:
        pytest.skip("the default model has not been converted in this OPT_HOME")
    real = AutoTokenizer.from_pretrained(folders[0])
    assert not template_renders_tools(real)  # SmolLM2's template ignores tools
    prompt = chat_prompt(real, [{"role": "user", "content": "Weather in Rome?"}], TOOLS)
    assert prompt.startswith("<|im_start|>system\nYou are a function calling AI model.")
    assert prompt.endswith("<|im_start|>user\nWeather in Rome?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
                         "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                         "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }}"
                         "{{ c.function.arguments | tojson }}{% endfor %} | {% endfor %}")
    assert template_renders_tools(tok)
    prompt = chat_prompt(tok, [{"role": "user", "content": "hi"},
                               {"role": "assistant", "tool_calls": [
                                   {"function": {"name": "list_models", "arguments": "{}"}}]},
                               {"role": "tool", "content": "[]"}], TOOLS)
    assert prompt == ("TOOL get_weather\nTOOL list_models\nuser: hi | "
                      "assistant:  CALL list_models{} | tool: [] | ")


# -- grammars on a tiny random model ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    pytest.importorskip("llguidance")
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return varied_tiny_model(), tok


def _decode(model: torch.nn.Module, tok: object, grammar: str, prompt: str) -> str:
    from openpto.engines.grammar import GrammarCompiler

    constraint = GrammarCompiler(tok, 512).constraint(grammar)
    ids = tok(prompt)["input_ids"]  # type: ignore[operator]
    out = []
    with one_thread():
        for token in token_steps(model, ids, SamplingParams(max_tokens=200),
                                 constraint=constraint):
            if token == tok.eos_token_id:  # type: ignore[attr-defined]
                break
            out.append(token)
    return str(tok.decode(out))  # type: ignore[attr-defined]


def test_forced_calls_parse_on_a_random_model(tiny: tuple[torch.nn.Module, object]) -> None:
    from openpto.engines.grammar import tool_call_grammar

    model, tok = tiny
    for choice in ("required", "get_weather"):
        text = _decode(model, tok, tool_call_grammar(TOOLS, choice, parallel=False), "Weather?")
        parsed = parse_reply(text, TOOLS)
        assert parsed.errors == [] and len(parsed.tool_calls) == 1, text
        if choice == "get_weather":
            assert parsed.tool_calls[0].name == "get_weather"
            assert json.loads(parsed.tool_calls[0].arguments)["city"] in ("Paris", "Rome")


def test_json_schema_reply_validates(tiny: tuple[torch.nn.Module, object]) -> None:
    from openpto.engines.grammar import json_grammar

    model, tok = tiny
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "size": {"enum": ["S", "M", "L"]}},
              "required": ["ok", "size"]}
    text = _decode(model, tok, json_grammar(schema), "Answer:")
    Draft202012Validator(schema).validate(json.loads(text))


def test_auto_grammar_allows_text_or_a_well_formed_call() -> None:
    llguidance = pytest.importorskip("llguidance")
    from openpto.engines.grammar import GrammarCompiler, tool_call_grammar

    tok = tiny_tokenizer()
    compiler = GrammarCompiler(tok, 512)
    grammar = tool_call_grammar(TOOLS, "auto", parallel=True)
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    accepted = {"Just text, 1 < 2.": True, "Sure. " + call: True, call + "\n" + call: True,
                "Sure. <tool_call>not json": False, call + " trailing text": False,
                '<tool_call>{"name": "rm", "arguments": {}}</tool_call>': False}
    for text, ok in accepted.items():
        constraint = compiler.constraint(grammar)
        consumed = constraint.matcher.consume_tokens(tok(text)["input_ids"])
        assert (consumed and constraint.done) == ok, text
    assert isinstance(compiler.constraint(grammar).matcher, llguidance.LLMatcher)


def test_masked_rows_leave_the_others_untouched(tiny: tuple[torch.nn.Module, object]) -> None:
    """The batch scheduler: greedy tokens of an unconstrained request are those it gets alone,
    while constrained requests share its batch; the constrained replies parse."""
    import asyncio

    from openpto.engines.batching import BatchScheduler
    from openpto.engines.grammar import GrammarCompiler, tool_call_grammar
    from openpto.engines.streams import RequestStream

    model, tok = tiny
    compiler = GrammarCompiler(tok, 512)
    params = SamplingParams(max_tokens=40)
    prompts = [tok(p)["input_ids"] for p in ("Tell me about lists", "Weather?", "Rome")]
    alone = generate_text(model, tok, prompts[0], params).text
    scheduler = BatchScheduler(model, tok, eos={2}, max_batch=4, threads=1)

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        streams = [RequestStream(loop, max_pending=100) for _ in prompts]
        grammar = tool_call_grammar(TOOLS, "required", parallel=False)
        for i, (ids, stream) in enumerate(zip(prompts, streams, strict=True)):
            scheduler.submit(ids, params.replace(max_tokens=200) if i else params, stream,
                             compiler.constraint(grammar) if i else None)
        texts = []
        for stream in streams:
            texts.append("".join([r.text async for r in stream.events()]))
        return texts

    try:
        texts = asyncio.run(run())
    finally:
        scheduler.close()
    assert texts[0] == alone
    for text in texts[1:]:
        assert len(parse_reply(text, TOOLS).tool_calls) == 1, text
