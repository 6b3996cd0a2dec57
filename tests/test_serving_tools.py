"""Tool calls and JSON replies through a real uvicorn on loopback, with the official clients.

The model is test_serving's tiny random Llama; grammars make its calls parse whatever it
"thinks". One test runs the real default model (SmolLM2-135M) with a forced tool choice.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import pytest
from jsonschema import Draft202012Validator

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
pytest.importorskip("llguidance")

from openpto.engines.engine import EngineOptions  # noqa: E402
from openpto.engines.grammar import MAX_PARALLEL_CALLS  # noqa: E402
from openpto.engines.torch_backend import TorchEngine  # noqa: E402
from openpto.serving import ServerSettings, create_app  # noqa: E402
from openpto.serving.background import BackgroundServer  # noqa: E402
from tests.test_serving import (  # noqa: E402
    AUTH,
    KEY,
    MODEL,
    Served,
    chat_tokenizer,
    varied_tiny_model,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                   "required": ["city"], "additionalProperties": False}}}
LIST = {"type": "function", "function": {"name": "list_models", "description": "Saved models",
                                         "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Rome?"}]
PERSON = {"type": "object", "properties": {"name": {"enum": ["Ada", "Alan"]},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 120},
                                           "admin": {"type": "boolean"}},
          "required": ["name", "age", "admin"], "additionalProperties": False}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    db = tmp_path_factory.mktemp("serving-tools") / "opt.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPT_DB", str(db))
        model, tok = varied_tiny_model(), chat_tokenizer()
        engine = TorchEngine.from_model(model, tok, MODEL, EngineOptions(max_batch=4, threads=1))
        settings = ServerSettings(api_key=KEY, max_tokens_limit=1000, stream_buffer=4)
        app = create_app(settings, engine, access_sink=None)
        with BackgroundServer(app) as server:
            yield Served(server, engine, model, tok, [], db)


def test_forced_tool_call_round_trip(served: Served) -> None:
    client = served.openai()
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, LIST], max_tokens=200, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False, store=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    # The call and its result go back as the conversation's next turns.
    follow = client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, tools=[WEATHER, LIST], tool_choice="none",
        messages=[*ASK, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "22 C, sunny"}])
    assert follow.choices[0].finish_reason == "length"
    assert follow.choices[0].message.tool_calls is None
    prompt = served.engine.chat_prompt_with_tools(
        [*ASK, choice.message.model_dump(exclude_none=True),
         {"role": "tool", "tool_call_id": call.id, "content": "22 C, sunny"}])
    assert '<tool_response>{"name": "get_weather", "content": "22 C, sunny"}' in prompt
    assert follow.usage.prompt_tokens == len(served.engine.tokenize(prompt))


def test_required_tool_choice_streams_each_call_as_one_delta(served: Served) -> None:
    chunks = list(served.openai().chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, LIST], tool_choice="required",
        parallel_tool_calls=True, max_tokens=800, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls for d in deltas if d.tool_calls]
    # The random model repeats calls; the grammar ends the reply after MAX_PARALLEL_CALLS,
    # and each distinct call comes once.
    assert 1 < len(calls) <= MAX_PARALLEL_CALLS and all(len(c) == 1 for c in calls)
    assert len({(c[0].function.name, c[0].function.arguments) for c in calls}) == len(calls)
    assert [c[0].index for c in calls] == list(range(len(calls)))
    for [call] in calls:  # each call complete in its one delta
        assert call.id.startswith("call_") and call.function.name in ("get_weather",
                                                                      "list_models")
        json.loads(call.function.arguments)
    assert not any(d.content for d in deltas)  # a forced call has no text before it
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0


def test_json_schema_reply_validates(served: Served) -> None:
    client = served.openai()
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A user as JSON"}], max_tokens=200,
        temperature=0.8, seed=3, n=2,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    for choice in reply.choices:
        Draft202012Validator(PERSON).validate(json.loads(choice.message.content))
    loose = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "JSON"}], max_tokens=300,
        temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(loose.choices[0].message.content), dict)


def test_auto_text_streams_like_plain_chat_and_batches_with_constrained(served: Served) -> None:
    """An unconstrained request batched with constrained ones: exactly its lone greedy text."""
    question = "Tell me about lists"
    expected = served.greedy(question, 24)

    async def together() -> list[object]:
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
        plain = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=24,
            temperature=0)
        forced = [client.chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200,
            temperature=0) for _ in range(2)]
        schema = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=200, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "p",
                                                                     "schema": PERSON}})
        return list(await asyncio.gather(plain, *forced, schema))

    plain, *forced, schema = asyncio.run(together())
    assert plain.choices[0].message.content == expected  # type: ignore[attr-defined]
    for reply in forced:
        assert reply.choices[0].message.tool_calls[0].function.name == "get_weather"  # type: ignore[attr-defined]
    Draft202012Validator(PERSON).validate(
        json.loads(schema.choices[0].message.content))  # type: ignore[attr-defined]


def test_auto_reply_is_parsed_and_never_fails(served: Served) -> None:
    """auto: text or a well-formed call; with the tiny model either is fine, as long as the
    reply is consistent: calls parse, text has no tags, finish_reason matches."""
    for seed in range(3):
        reply = served.openai().chat.completions.create(
            model=MODEL, messages=ASK, tools=[WEATHER, LIST], max_tokens=60, temperature=1.0,
            seed=seed)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
        else:
            assert "<tool_call>" not in (choice.message.content or "") or \
                choice.finish_reason == "length"


def test_ollama_chat_tools_and_format(served: Served) -> None:
    client = ollama.Client(host=served.url, headers=AUTH)
    answer = client.chat(model=MODEL, messages=[{"role": "user", "content": "A user"}],
                         format=PERSON, options={"temperature": 0, "num_predict": 200})
    Draft202012Validator(PERSON).validate(json.loads(answer.message.content))
    answer = client.chat(model=MODEL, messages=[{"role": "user", "content": "JSON"}],
                         format="json", options={"temperature": 0, "num_predict": 300})
    assert isinstance(json.loads(answer.message.content), dict)
    # Tools in Ollama's shape, a call and its result fed back; streamed and not.
    reply = client.chat(model=MODEL, messages=ASK, tools=[WEATHER],
                        options={"temperature": 0, "num_predict": 60})
    assert reply.done
    for call in reply.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    parts = list(client.chat(model=MODEL, messages=ASK, tools=[WEATHER], stream=True,
                             options={"temperature": 0, "num_predict": 60}))
    text = "".join(p.message.content for p in parts)
    streamed_calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert text == reply.message.content
    assert [(c.function.name, c.function.arguments) for c in streamed_calls] == [
        (c.function.name, c.function.arguments) for c in reply.message.tool_calls or []]
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "25 C", "tool_name": "get_weather"}]
    after = client.chat(model=MODEL, messages=history, options={"temperature": 0,
                                                                "num_predict": 5})
    assert after.eval_count == 5


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"tools": [{"type": "function", "function": {"name": "f",
                                                  "parameters": {"type": "nope"}}}]},
     "tools", "tool 'f'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "rm"}}},
     "tool_choice", "'rm'"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "tool_choice must be"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format", "not a valid JSON Schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "'yaml'"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format",
     "together with tools"),
])
def test_bad_tool_requests_are_400s(served: Served, body: dict[str, object], param: str,
                                    message: str) -> None:
    response = httpx.post(served.url + "/v1/chat/completions", headers=AUTH,
                          json={"model": MODEL, "messages": ASK, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_ollama_bad_format_is_a_400(served: Served) -> None:
    response = httpx.post(served.url + "/api/chat", headers=AUTH, json={
        "model": MODEL, "messages": ASK, "format": {"type": "nope"}})
    assert response.status_code == 400 and "not a valid JSON Schema" in response.json()["error"]


def test_without_the_grammar_extra(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced calls and JSON replies need llguidance: a 400 saying what to install; auto still
    works, unconstrained."""
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance -> ImportError
    monkeypatch.setitem(sys.modules, "llguidance.hf", None)
    for body in ({"tools": [WEATHER], "tool_choice": "required"},
                 {"response_format": {"type": "json_object"}}):
        response = httpx.post(served.url + "/v1/chat/completions", headers=AUTH,
                              json={"model": MODEL, "messages": ASK, "max_tokens": 5, **body})
        assert response.status_code == 400
        assert "pip install 'openpto[grammar]'" in response.json()["error"]["message"]
    reply = served.openai().chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER],
                                                    max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_a_backend_that_cannot_mask_says_so() -> None:
    from openpto.engines.llamacpp_backend import LlamaCppEngine
    from openpto.serving.errors import APIError
    from openpto.serving.tools import plan_request

    # Only the class's declared capability is read: no llama.cpp install or model needed.
    engine = object.__new__(LlamaCppEngine)
    assert not engine.supports_constraints
    for body in ({"tool_choice": "required"}, {"tools": None, "json_schema": {"type": "object"}}):
        with pytest.raises(APIError, match="llamacpp backend cannot constrain") as caught:
            plan_request(engine, **{"tools": [WEATHER], "tool_choice": None, "parallel": None,
                                    "json_schema": None, **body})
        assert caught.value.status == 400 and "--backend torch" in caught.value.message
    assert plan_request(engine, tools=[WEATHER], tool_choice="auto", parallel=None,
                        json_schema=None).grammar is None  # auto: parsed, unconstrained


def test_mlx_backend_masks_through_its_logits_processors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("mlx_lm")
    from openpto.core.sampling import SamplingParams
    from openpto.engines.engine import engine_records
    from openpto.engines.grammar import json_grammar, tool_call_grammar
    from openpto.engines.mlx_backend import MLXEngine
    from openpto.engines.tool_calls import parse_reply, parse_tools

    folder = tmp_path / "tiny-mlx"
    varied_tiny_model().save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    engine = MLXEngine(str(folder))
    engine.load()
    try:
        tools = parse_tools([WEATHER, LIST])
        ids = engine.tokenize(engine.chat_prompt_with_tools(ASK, tools))
        records = engine_records(engine, ids, SamplingParams(max_tokens=200),
                                 engine.constraint(tool_call_grammar(tools, "get_weather",
                                                                     parallel=False)))
        parsed = parse_reply("".join(r.text for r in records), tools)
        assert [c.name for c in parsed.tool_calls] == ["get_weather"] and not parsed.errors
        records = engine_records(engine, ids, SamplingParams(max_tokens=200),
                                 engine.constraint(json_grammar(PERSON)))
        Draft202012Validator(PERSON).validate(json.loads("".join(r.text for r in records)))
    finally:
        engine.close()


@pytest.mark.integration
def test_default_model_forced_calls_always_parse() -> None:
    engine = TorchEngine(None, EngineOptions(max_batch=4))
    app = create_app(ServerSettings(), engine, access_sink=None)
    prompts = ["What's the weather like in Paris?", "List my saved models, please."]
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        for prompt in prompts:
            reply = client.chat.completions.create(
                model="smollm2-135m", messages=[{"role": "user", "content": prompt}],
                tools=[WEATHER, LIST], tool_choice="required", max_tokens=80, temperature=0)
            assert reply.choices[0].finish_reason == "tool_calls"
            [call] = reply.choices[0].message.tool_calls
            assert call.function.name in ("get_weather", "list_models")
            json.loads(call.function.arguments)
