"""The same API over the other backends: MLX (mlx-lm, CPU build on Linux) and llama.cpp.

Each backend is driven through the same clients as the torch backend; the tests skip cleanly
when a backend's package is not installed (llama-cpp-python builds from source for ~13 minutes,
so it is usually absent here).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")

from openpto.core.generate import generate_text  # noqa: E402
from openpto.core.sampling import SamplingParams  # noqa: E402
from openpto.serving import EngineOptions, ServerSettings, create_app, make_engine  # noqa: E402
from openpto.serving.background import BackgroundServer  # noqa: E402
from tests.test_serving import chat_tokenizer, varied_tiny_model  # noqa: E402

MODEL = "tiny-folder"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    folder = tmp_path_factory.mktemp("backends") / MODEL
    model, tok = varied_tiny_model(), chat_tokenizer()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def _check_backend(backend: str, folder: Path, model: object, tok: object) -> None:
    engine = make_engine(backend, str(folder), EngineOptions())
    app = create_app(ServerSettings(), engine, access_sink=None)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        assert next(m.id for m in client.models.list()) == MODEL
        messages = [{"role": "user", "content": "Tell me about lists"}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                               temperature=0)
        ids = engine.tokenize(engine.chat_prompt(messages))
        expected = generate_text(model, tok, ids, SamplingParams(max_tokens=12))
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.usage.completion_tokens == 12
        # Another framework's float32 kernels: the same greedy tokens on this well-separated model.
        assert reply.choices[0].message.content == expected.text
        chunks = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=6,
                                           temperature=0, stream=True)
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        assert streamed == generate_text(model, tok, engine.tokenize("def f(x):"),
                                         SamplingParams(max_tokens=6)).text
        ollama_client = ollama.Client(host=server.url)
        answer = ollama_client.chat(model=MODEL, messages=messages,
                                    options={"temperature": 0, "num_predict": 12})
        assert answer.message.content == expected.text and answer.eval_count == 12
        vectors = client.embeddings.create(model=MODEL, input=["one", "two"]).data
        assert len(vectors) == 2 and len(vectors[0].embedding) == 64
        assert abs(sum(x * x for x in vectors[0].embedding) - 1.0) < 1e-4


def test_mlx_backend_serves_the_same_api(tiny_folder: tuple[Path, object, object]) -> None:
    pytest.importorskip("mlx_lm")
    _check_backend("mlx", *tiny_folder)


@pytest.mark.integration
def test_llamacpp_backend_serves_the_same_api() -> None:
    """The default model's own Q4_1 GGUF through llama.cpp. llama.cpp computes with quantized
    activations, so its greedy text is not the float model's; it must be llama.cpp's own."""
    pytest.importorskip("llama_cpp")
    engine = make_engine("llamacpp", None, EngineOptions())
    app = create_app(ServerSettings(), engine, access_sink=None)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        assert [m.id for m in client.models.list()] == ["smollm2-135m"]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2-135m", messages=messages,
                                               max_tokens=24, temperature=0)
        own = engine._require().create_completion(
            engine.chat_prompt(messages), temperature=0.0, max_tokens=24)["choices"][0]["text"]
        assert reply.choices[0].message.content == own and own.strip()
        assert reply.usage.prompt_tokens == len(engine.tokenize(engine.chat_prompt(messages)))
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model="smollm2-135m",
                                                          messages=messages, max_tokens=24,
                                                          temperature=0, stream=True)
                           if c.choices)
        assert streamed == reply.choices[0].message.content
        answer = ollama.Client(host=server.url).chat(
            model="smollm2-135m", messages=messages, options={"temperature": 0,
                                                              "num_predict": 24})
        assert answer.message.content == reply.choices[0].message.content
        vectors = client.embeddings.create(model="smollm2-135m", input=["one", "two"]).data
        assert len(vectors[0].embedding) == 576
        assert abs(sum(x * x for x in vectors[0].embedding) - 1.0) < 1e-4


@pytest.mark.integration
def test_mlx_backend_on_the_default_model() -> None:
    """mlx-lm reading the cached float conversion of the default GGUF (its RoPE base comes from
    transformers 5's ``rope_parameters``): the same greedy text as torch."""
    pytest.importorskip("mlx_lm")
    from openpto.models import load_model

    engine = make_engine("mlx", None, EngineOptions())
    app = create_app(ServerSettings(), engine, access_sink=None)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        reply = client.chat.completions.create(model="smollm2-135m", messages=messages,
                                               max_tokens=16, temperature=0)
        ids = engine.tokenize(engine.chat_prompt(messages))
    loaded = load_model(None)
    expected = generate_text(loaded.model, loaded.tokenizer, ids, SamplingParams(max_tokens=16))
    assert "Paris" in expected.text
    assert reply.choices[0].message.content == expected.text


def test_torch_backend_serves_a_quantized_artifact_on_packed_kernels(
        tiny_folder: tuple[Path, object, object], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from openpto.cli.main import app as cli
    from openpto.models import load_model

    monkeypatch.setenv("OPT_DB", str(tmp_path / "opt.db"))
    artifact = tmp_path / "tiny-rtn"
    done = CliRunner().invoke(cli, ["quantize", str(tiny_folder[0]), "--method", "rtn", "--bits",
                                    "4", "--group-size", "32", "--output", str(artifact)])
    assert done.exit_code == 0, done.output
    engine = make_engine("torch", str(artifact), EngineOptions(threads=1))
    server_app = create_app(ServerSettings(), engine, access_sink=None)
    with BackgroundServer(server_app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
        reply = client.completions.create(model="tiny-rtn", prompt="The list", max_tokens=12,
                                          temperature=0)
        layers = engine._model.model.layers  # type: ignore[union-attr]
        layer_modules = {type(m).__name__ for m in layers.modules()}
        assert engine.info.quantization == "rtn-w4-g32"
    loaded = load_model(str(artifact))
    expected = generate_text(loaded.model, loaded.tokenizer, loaded.tokenizer("The list")
                             ["input_ids"], SamplingParams(max_tokens=12))
    assert reply.choices[0].text == expected.text
    # Every decoder Linear runs packed (the tied lm_head stays a float Linear).
    assert "QuantLinear" in layer_modules and "Linear" not in layer_modules


def test_missing_backend_package_names_its_extra() -> None:
    import importlib.util

    from openpto.errors import MissingDependency

    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed")
    with pytest.raises(MissingDependency, match=r"openpto\[llamacpp\]"):
        make_engine("llamacpp", None, EngineOptions())
