"""opt ollama against a fake Ollama that replays the documented protocol (pytest-httpserver):
every client command, pull's NDJSON progress, push's blob upload (skipped when the server has
the digest) and create, and the bad inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.helpers import run_opt

pytest.importorskip("ollama")


def _ndjson(*chunks: dict) -> str:
    return "".join(json.dumps(c) + "\n" for c in chunks)


def _opt(args: list[str], server: HTTPServer, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    return run_opt(["ollama", *args, "--host", server.url_for("/").rstrip("/")], capsys,
                   monkeypatch)


MODEL = {"model": "smollm2:135m", "name": "smollm2:135m", "size": 91739744,
         "digest": "sha256:" + "a" * 64, "modified_at": "2026-12-01T10:00:00Z",
         "details": {"format": "gguf", "family": "llama", "parameter_size": "134.52M",
                     "quantization_level": "Q4_1"}}


def test_list_ps_show_delete_copy(httpserver: HTTPServer, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    httpserver.expect_request("/api/tags", method="GET").respond_with_json({"models": [MODEL]})
    httpserver.expect_request("/api/ps", method="GET").respond_with_json(
        {"models": [{**MODEL, "expires_at": "2026-12-01T10:05:00Z", "size_vram": 0}]})
    httpserver.expect_request("/api/show", method="POST", json={"model": "smollm2:135m"}) \
        .respond_with_json({"template": "{{ .Prompt }}", "parameters": 'stop "<|im_end|>"',
                            "license": "Apache-2.0", "details": MODEL["details"],
                            "model_info": {"general.architecture": "llama"}})
    httpserver.expect_request("/api/delete", method="DELETE", json={"model": "old:1"}) \
        .respond_with_data("")
    httpserver.expect_request("/api/copy", method="POST",
                              json={"source": "smollm2:135m", "destination": "mine:v1"}) \
        .respond_with_data("")

    code, out, _ = _opt(["list", "--json"], httpserver, capsys, monkeypatch)
    listed = json.loads(out)
    assert code == 0 and listed["models"][0]["model"] == "smollm2:135m"
    assert listed["models"][0]["details"]["quantization_level"] == "Q4_1"
    assert listed["host"] == httpserver.url_for("/").rstrip("/")
    code, out, _ = _opt(["ps", "--json"], httpserver, capsys, monkeypatch)
    assert json.loads(out)["models"][0]["expires_at"].startswith("2026-12-01T10:05")
    code, out, _ = _opt(["show", "smollm2:135m", "--json"], httpserver, capsys, monkeypatch)
    assert json.loads(out)["license"] == "Apache-2.0"
    code, out, _ = _opt(["delete", "old:1", "--json"], httpserver, capsys, monkeypatch)
    assert code == 0 and json.loads(out)["status"] == "success"
    code, out, _ = _opt(["copy", "smollm2:135m", "mine:v1", "--json"], httpserver, capsys,
                        monkeypatch)
    assert code == 0 and json.loads(out)["destination"] == "mine:v1"


def test_chat_and_generate_stream_their_text(httpserver: HTTPServer, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def chat(request: Request) -> Response:
        body = json.loads(request.data)
        assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}]
        assert body["stream"] is True and body["options"] == {"temperature": 0.0,
                                                                 "num_predict": 8}
        return Response(_ndjson(
            {"model": "m", "created_at": "2026-12-01T10:00:00Z",
             "message": {"role": "assistant", "content": "Hel"}, "done": False},
            {"model": "m", "created_at": "2026-12-01T10:00:00Z",
             "message": {"role": "assistant", "content": "lo."}, "done": False},
            {"model": "m", "created_at": "2026-12-01T10:00:01Z",
             "message": {"role": "assistant", "content": ""}, "done": True,
             "done_reason": "stop", "eval_count": 2, "prompt_eval_count": 9}),
            content_type="application/x-ndjson")

    httpserver.expect_request("/api/chat", method="POST").respond_with_handler(chat)
    httpserver.expect_request("/api/generate", method="POST").respond_with_data(_ndjson(
        {"model": "m", "created_at": "2026-12-01T10:00:00Z", "response": "Once", "done": False},
        {"model": "m", "created_at": "2026-12-01T10:00:00Z", "response": " upon", "done": True,
         "done_reason": "length", "context": [1, 2, 3], "eval_count": 2}),
        content_type="application/x-ndjson")

    args = ["chat", "m", "Hi", "--system", "Be brief.", "--temperature", "0", "--max-tokens", "8"]
    code, out, _ = _opt(args, httpserver, capsys, monkeypatch)
    assert code == 0 and out == "Hello.\n"
    code, out, _ = _opt([*args, "--json"], httpserver, capsys, monkeypatch)
    reply = json.loads(out)
    assert reply["message"] == {"role": "assistant", "content": "Hello."}
    assert reply["done_reason"] == "stop" and reply["eval_count"] == 2
    code, out, _ = _opt(["generate", "m", "Tell me", "--json"], httpserver, capsys, monkeypatch)
    reply = json.loads(out)
    assert reply["response"] == "Once upon" and "context" not in reply
    assert reply["done_reason"] == "length"


def test_embed_and_pull_progress(httpserver: HTTPServer, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    httpserver.expect_request("/api/embed", method="POST",
                              json={"model": "m", "input": ["a", "b"]}) \
        .respond_with_json({"model": "m", "embeddings": [[0.6, 0.8], [1.0, 0.0]]})
    layer = "sha256:" + "b" * 64
    httpserver.expect_request("/api/pull", method="POST").respond_with_data(_ndjson(
        {"status": "pulling manifest"},
        {"status": f"pulling {layer[7:19]}", "digest": layer, "total": 1000, "completed": 0},
        {"status": f"pulling {layer[7:19]}", "digest": layer, "total": 1000, "completed": 1000},
        {"status": "verifying sha256 digest"}, {"status": "writing manifest"},
        {"status": "success"}), content_type="application/x-ndjson")

    code, out, _ = _opt(["embed", "m", "a", "b", "--json"], httpserver, capsys, monkeypatch)
    assert json.loads(out)["embeddings"] == [[0.6, 0.8], [1.0, 0.0]]
    code, out, err = _opt(["pull", "smollm2:135m"], httpserver, capsys, monkeypatch)
    assert code == 0 and "pulling manifest" in err and "writing manifest" in err
    code, out, _ = _opt(["pull", "smollm2:135m", "--json"], httpserver, capsys, monkeypatch)
    assert json.loads(out)["status"] == "success"


def test_server_errors_and_a_silent_host_are_one_line(httpserver: HTTPServer, capsys,  # type: ignore[no-untyped-def]
                                                      monkeypatch) -> None:
    httpserver.expect_request("/api/show", method="POST").respond_with_json(
        {"error": "model 'nope' not found"}, status=404)
    httpserver.expect_request("/api/pull", method="POST").respond_with_data(_ndjson(
        {"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}),
        content_type="application/x-ndjson")
    code, out, err = _opt(["show", "nope"], httpserver, capsys, monkeypatch)
    assert code == 1 and out == "" and err == f"error: {httpserver.url_for('/').rstrip('/')}: " \
        "model 'nope' not found (HTTP 404)\n"
    code, _, err = _opt(["pull", "nope", "--json"], httpserver, capsys, monkeypatch)
    assert code == 1 and "file does not exist" in err and len(err.splitlines()) == 1

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
    for args in (["list"], ["chat", "m", "hi"], ["pull", "m"]):
        code, out, err = run_opt(["ollama", *args], capsys, monkeypatch)
        assert code == 1 and out == ""
        assert err == (f"error: nothing answers at http://127.0.0.1:{port}: start Ollama "
                       "(ollama serve) or opt serve there, or pass --host\n")


# -- push --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-bit group-32 symmetric RTN artifact whose tokenizer has the default model's
    ChatML template."""
    from openpto.core.quant import RTNConfig
    from openpto.models import save_model
    from openpto.pipeline.quantize import quantize
    from openpto.pipeline.workflow import QuantizeOptions
    from openpto.store import Store
    from tests.helpers import tiny_llama, tiny_tokenizer
    from tests.test_ollama_templates import SMOLLM2

    root = tmp_path_factory.mktemp("push")
    tok = tiny_tokenizer()
    tok.chat_template = SMOLLM2
    folder = save_model(tiny_llama(seed=3), tok, root / "tiny")
    out = root / "w4g32"
    quantize(str(folder), RTNConfig(bits=4, group_size=32, symmetric=True),
             QuantizeOptions(output=out), store=Store(root / "opt.db"))
    return out


class FakeOllama:
    """Blobs and create as Ollama's API documents them; remembers what it was sent."""

    def __init__(self, server: HTTPServer) -> None:
        self.blobs: dict[str, bytes] = {}
        self.created: list[dict] = []
        server.expect_request("/api/create", method="POST").respond_with_handler(self.create)
        server.expect_request(
            __import__("re").compile(r"/api/blobs/sha256:[0-9a-f]{64}")).respond_with_handler(
            self.blob)

    def blob(self, request: Request) -> Response:
        digest = request.path.rsplit("/", 1)[1]
        if request.method == "HEAD":
            return Response(status=200 if digest in self.blobs else 404)
        data = request.get_data()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return Response(json.dumps({"error": "digest mismatch"}), status=400)
        self.blobs[digest] = data
        return Response(status=201)

    def create(self, request: Request) -> Response:
        body = json.loads(request.data)
        if any(d not in self.blobs for d in body.get("files", {}).values()):
            return Response(json.dumps({"error": "blob not found"}), status=400)
        self.created.append(body)
        return Response(_ndjson({"status": "parsing GGUF"}, {"status": "writing manifest"},
                                {"status": "success"}), content_type="application/x-ndjson")


def test_push_uploads_once_and_creates_with_the_converted_template(  # type: ignore[no-untyped-def]
        httpserver: HTTPServer, chat_artifact: Path, tmp_path: Path, tmp_db: Path, capsys,
        monkeypatch) -> None:
    import gguf

    fake = FakeOllama(httpserver)
    modelfile = tmp_path / "Modelfile"
    code, out, err = _opt(["push", str(chat_artifact), "--name", "tiny-w4", "--modelfile",
                           str(modelfile), "--json"], httpserver, capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert result["name"] == "tiny-w4:latest" and result["uploaded"] is True
    assert result["gguf_type"] == "q4_0" and result["requantized"] == 0
    assert result["mapped_exactly"] > 0 and result["template_style"] == "chatml"
    gguf_path = Path(result["gguf"])
    data = gguf_path.read_bytes()
    assert result["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert fake.blobs[result["digest"]] == data and result["size_bytes"] == len(data)
    reader = gguf.GGUFReader(gguf_path)
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q4_0 for t in reader.tensors)

    created = fake.created[0]
    assert created["model"] == "tiny-w4:latest"
    assert created["files"] == {"model.gguf": result["digest"]}
    assert created["template"].startswith("{{- range .Messages }}<|im_start|>")
    assert created["system"].startswith("You are a helpful AI assistant named SmolLM")
    assert created["parameters"] == {"stop": ["<|im_start|>", "<|im_end|>"]}
    text = modelfile.read_text()
    assert text.startswith(f"FROM ./{gguf_path.name}\n")
    assert f'TEMPLATE """{created["template"]}"""' in text

    # The server has the blob now: a second push (another name) only creates.
    posted = len([r for r, _ in httpserver.log if r.method == "POST" and "blobs" in r.path])
    code, out, _ = _opt(["push", str(chat_artifact), "--name", "tiny-w4:second", "--json"],
                        httpserver, capsys, monkeypatch)
    again = json.loads(out)
    assert code == 0 and again["uploaded"] is False and again["digest"] == result["digest"]
    assert len([r for r, _ in httpserver.log if r.method == "POST" and "blobs" in r.path]) \
        == posted
    assert fake.created[-1]["model"] == "tiny-w4:second"


def test_push_refuses_bad_input_and_leaves_a_modelfile_to_edit(  # type: ignore[no-untyped-def]
        httpserver: HTTPServer, chat_artifact: Path, tmp_path: Path, tmp_db: Path, capsys,
        monkeypatch) -> None:
    import shutil

    fake = FakeOllama(httpserver)
    code, _, err = _opt(["push", str(tmp_path), "--name", "x"], httpserver, capsys, monkeypatch)
    assert code == 2 and "is not an artifact written by opt" in err
    for bad in ("../etc/passwd", "a/../b", "/abs", "a\\b", "name:"):
        code, _, err = _opt(["push", str(chat_artifact), "--name", bad], httpserver, capsys,
                            monkeypatch)
        assert code == 2 and "not a model name" in err, bad

    odd = tmp_path / "odd"
    shutil.copytree(chat_artifact, odd)
    config = json.loads((odd / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}### {{ m.content }}\n{% endfor %}"
    (odd / "tokenizer_config.json").write_text(json.dumps(config))
    (odd / "chat_template.jinja").unlink(missing_ok=True)
    code, _, err = _opt(["push", str(odd), "--name", "odd"], httpserver, capsys, monkeypatch)
    assert code == 2 and "neither ChatML" in err and "--modelfile" in err
    modelfile = tmp_path / "mf" / "Modelfile"
    modelfile.parent.mkdir()
    code, _, err = _opt(["push", str(odd), "--name", "odd", "--modelfile", str(modelfile)],
                        httpserver, capsys, monkeypatch)
    assert code == 2 and "written for you to edit" in err
    draft = modelfile.read_text()
    assert draft.startswith("FROM ./odd-latest.gguf\n") and "#   {% for m in messages %}" in draft
    assert (modelfile.parent / "odd-latest.gguf").stat().st_size > 0
    assert fake.blobs == {} and fake.created == []  # nothing reached the server
