"""The server on the real default model (SmolLM2-135M-Instruct): greedy text equal to the engine's
batch-1 text, alone and batched, through both API families."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

from openpto.core.generate import generate_text  # noqa: E402
from openpto.core.sampling import SamplingParams  # noqa: E402
from openpto.engines.torch_backend import TorchEngine  # noqa: E402
from openpto.serving import EngineOptions, ServerSettings, create_app  # noqa: E402
from openpto.serving.background import BackgroundServer  # noqa: E402

MODEL = "smollm2-135m"


@pytest.mark.integration
def test_default_model_served_batched_and_alone() -> None:
    engine = TorchEngine(None, EngineOptions(max_batch=4))
    app = create_app(ServerSettings(), engine, access_sink=None)
    questions = ["What is the capital of France?", "Name three colours.",
                 "What is 2 + 2?"]
    with BackgroundServer(app) as server:
        model, tok = engine._model, engine._tokenizer

        def greedy(question: str) -> str:
            ids = engine.tokenize(engine.chat_prompt([{"role": "user", "content": question}]))
            return generate_text(model, tok, ids, SamplingParams(max_tokens=16)).text

        expected = [greedy(q) for q in questions]
        assert "Paris" in expected[0]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        alone = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": questions[0]}], max_tokens=16,
            temperature=0)
        assert alone.choices[0].message.content == expected[0]

        async def together() -> list[str]:
            aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="-")
            replies = await asyncio.gather(*(aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=16,
                temperature=0) for q in questions))
            return [r.choices[0].message.content or "" for r in replies]

        assert asyncio.run(together()) == expected
        answer = ollama.Client(host=server.url).chat(
            model=MODEL, messages=[{"role": "user", "content": questions[0]}],
            options={"temperature": 0, "num_predict": 16})
        assert answer.message.content == expected[0]
        vectors = client.embeddings.create(model=MODEL, input=["Paris", "London"]).data
        assert len(vectors[0].embedding) == 576
