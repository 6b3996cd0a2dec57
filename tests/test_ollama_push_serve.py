"""opt ollama push against a real opt serve on loopback (its blob, create and show routes), then
chat with the created model through the official client; the pushed template, system prompt,
stop strings and license come back from /api/show as they were sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
ollama = pytest.importorskip("ollama")

from tests.helpers import run_opt  # noqa: E402
from tests.test_ollama_client import chat_artifact  # noqa: E402, F401  (a module fixture)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.test_serving_models import start_server

    tmp = tmp_path_factory.mktemp("push-serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPT_DB", str(tmp / "opt.db"))
        background, served = start_server(tmp)
        try:
            yield served
        finally:
            background.stop()


def test_push_to_opt_serve_then_chat_with_the_model(serve, chat_artifact: Path,  # type: ignore[no-untyped-def]  # noqa: F811
                                                    tmp_path: Path, capsys, monkeypatch) -> None:
    from openpto.core.generate import generate_text
    from openpto.core.sampling import SamplingParams
    from openpto.engines.engine import EngineOptions
    from openpto.engines.torch_backend import TorchEngine

    modelfile = tmp_path / "Modelfile"
    args = ["ollama", "push", str(chat_artifact), "--name", "tiny-push:w4", "--host", serve.url,
            "--modelfile", str(modelfile), "--json"]
    code, out, err = run_opt(args, capsys, monkeypatch)
    assert code == 0, err
    pushed = json.loads(out)
    assert pushed["uploaded"] is True and pushed["host"] == serve.url
    client = serve.client
    assert "tiny-push:w4" in [m.model for m in client.list().models]

    import httpx

    shown = httpx.post(f"{serve.url}/api/show", json={"model": "tiny-push:w4"}).json()
    assert shown["template"].startswith("{{- range .Messages }}<|im_start|>")
    assert shown["system"].startswith("You are a helpful AI assistant named SmolLM")
    assert '"<|im_end|>"' in shown["parameters"]
    assert 'SYSTEM """You are a helpful' in shown["modelfile"]

    # The same push again: the server has the blob, so nothing is uploaded.
    code, out, _ = run_opt([*args[:-3], "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["uploaded"] is False

    messages = [{"role": "user", "content": "Tell me about tea."}]
    reply = client.chat("tiny-push:w4", messages=messages,
                        options={"temperature": 0, "num_predict": 10})
    engine = TorchEngine(pushed["gguf"], EngineOptions(threads=1))
    engine.load()
    try:
        system = [{"role": "system", "content": shown["system"]}]
        ids = engine.tokenize(engine.chat_prompt(system + messages))
        want = generate_text(engine._model, engine._tokenizer, ids,
                             SamplingParams(max_tokens=10, stop=("<|im_start|>", "<|im_end|>"))
                             ).text
    finally:
        engine.close()
    assert reply.message.content == want

    code, out, _ = run_opt(["ollama", "copy", "tiny-push:w4", "tiny-push:copy", "--host",
                            serve.url, "--json"], capsys, monkeypatch)
    assert code == 0
    code, out, _ = run_opt(["ollama", "delete", "tiny-push:w4", "--host", serve.url, "--json"],
                           capsys, monkeypatch)
    assert code == 0
    names = [m.model for m in client.list().models]
    assert "tiny-push:copy" in names and "tiny-push:w4" not in names
    code, _, err = run_opt(["ollama", "delete", "tiny-push:w4", "--host", serve.url],
                           capsys, monkeypatch)
    assert code == 1 and "(HTTP 404)" in err and len(err.splitlines()) == 1
