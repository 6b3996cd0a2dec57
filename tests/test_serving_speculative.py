"""Speculative decoding of lone requests (``--draft``): same greedy text, counted drafts, and a
second request arriving mid-way moves the first into the batch without changing either text."""

from __future__ import annotations

import asyncio

import httpx
import pytest

openai = pytest.importorskip("openai")

from openpto.core.generate import generate_text  # noqa: E402
from openpto.core.sampling import SamplingParams  # noqa: E402
from openpto.engines.torch_backend import TorchEngine  # noqa: E402
from openpto.pipeline.generate import resolve_draft  # noqa: E402
from openpto.serving import EngineOptions, ServerSettings, create_app  # noqa: E402
from openpto.serving.background import BackgroundServer  # noqa: E402
from tests.helpers import tiny_llama  # noqa: E402
from tests.test_serving import chat_tokenizer  # noqa: E402

MODEL = "tiny-llama"


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} missing from /metrics")


@pytest.mark.parametrize("draft", ["lookup", "self:layers=1", "self:int8"])
def test_speculative_lone_and_joined_requests_keep_greedy_text(draft: str) -> None:
    # The unscaled random model repeats itself, which prompt lookup can predict.
    model, tok = tiny_llama(), chat_tokenizer()
    options = EngineOptions(max_batch=4, draft=draft, threads=1, resolve_draft=resolve_draft)
    engine = TorchEngine.from_model(model, tok, MODEL, options)
    app = create_app(ServerSettings(), engine, access_sink=None)

    def greedy(prompt: str, n: int) -> str:
        return generate_text(model, tok, engine.tokenize(prompt), SamplingParams(max_tokens=n)).text

    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        alone = client.completions.create(model=MODEL, prompt="The list", max_tokens=40,
                                          temperature=0)
        assert alone.choices[0].text == greedy("The list", 40)
        metrics = httpx.get(server.url + "/metrics").text
        drafted = _counter(metrics, "opt:spec_decode_num_draft_tokens_total")
        accepted = _counter(metrics, "opt:spec_decode_num_accepted_tokens_total")
        assert drafted > 0 and 0 < accepted <= drafted

        async def overlapping() -> list[str]:
            aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="-")

            async def ask(prompt: str, n: int, delay: float) -> str:
                await asyncio.sleep(delay)
                reply = await aclient.completions.create(model=MODEL, prompt=prompt,
                                                         max_tokens=n, temperature=0)
                return reply.choices[0].text

            return await asyncio.gather(ask("The list", 200, 0.0), ask("def f(x):", 20, 0.2))

        assert asyncio.run(overlapping()) == [greedy("The list", 200), greedy("def f(x):", 20)]
