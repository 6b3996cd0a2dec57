"""Resident memory does not grow across 500 sequential requests (leaks in the scheduler, the
stream bridge, the metrics or the access log would show here)."""

from __future__ import annotations

import gc

import httpx
import psutil
import pytest

pytest.importorskip("fastapi")

from openpto.engines.torch_backend import TorchEngine
from openpto.serving import EngineOptions, ServerSettings, create_app
from openpto.serving.background import BackgroundServer
from tests.test_serving import chat_tokenizer, varied_tiny_model

MODEL = "tiny-llama"


def test_rss_is_flat_over_500_requests() -> None:
    engine = TorchEngine.from_model(varied_tiny_model(), chat_tokenizer(), MODEL,
                                    # One thread: a two-thread OpenMP team is many times slower
                                    # on a busy machine (docs/benchmarks.md, Serving).
                                    EngineOptions(max_batch=4, threads=1))
    records: list[dict[str, object]] = []
    app = create_app(ServerSettings(), engine, access_sink=records.append)
    process = psutil.Process()
    bodies = [
        ("/v1/completions", {"model": MODEL, "prompt": "def f(x):", "max_tokens": 2,
                             "temperature": 0}),
        ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]}),
        ("/api/generate", {"model": MODEL, "prompt": "hello", "stream": True,
                           "options": {"num_predict": 2}}),
        ("/v1/embeddings", {"model": MODEL, "input": ["a", "b c"]}),
    ]

    def run(n: int) -> None:
        for i in range(n):
            path, body = bodies[i % len(bodies)]
            response = client.post(server.url + path, json=body)
            assert response.status_code == 200
            response.read()

    with BackgroundServer(app) as server, httpx.Client(timeout=60) as client:
        run(40)  # warm-up: allocator pools, lazily built code paths, metric label sets
        records.clear()
        gc.collect()
        before = process.memory_info().rss
        run(500)
        records.clear()  # the test's own log list is not the server's memory
        gc.collect()
        after = process.memory_info().rss
    growth_mb = (after - before) / 2**20
    print(f"RSS before {before / 2**20:.1f} MiB, after 500 requests {after / 2**20:.1f} MiB, "
          f"growth {growth_mb:.2f} MiB")
    # A leak of one 4 KiB buffer per request would already be 2 MiB; allow allocator noise.
    assert growth_mb < 8.0
