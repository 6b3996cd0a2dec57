"""Several models in one server and Ollama's model management, through the official ``ollama``
client against a real server on loopback.

The models are tiny random Llamas saved to temporary folders (and one exported to GGUF, uploaded
as a blob); every generated text is compared with ``core.generate`` on the same weights, loaded
the way the server loads them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

from openpto.core.generate import generate_text  # noqa: E402
from openpto.core.sampling import SamplingParams  # noqa: E402
from openpto.engines.engine import EngineOptions  # noqa: E402
from openpto.engines.torch_backend import TorchEngine  # noqa: E402
from openpto.serving import ServerSettings, create_app  # noqa: E402
from openpto.serving.background import BackgroundServer  # noqa: E402
from openpto.serving.model_routes import human_number  # noqa: E402
from openpto.serving.pool import FOREVER, parse_bytes, parse_keep_alive  # noqa: E402
from tests.test_serving import chat_tokenizer, varied_tiny_model  # noqa: E402

MAIN = "tiny-main"
GREEDY = {"temperature": 0, "num_predict": 12}


def tiny_size() -> int:
    model = varied_tiny_model()
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


class Models:
    """Tiny models on disk: folders ``tiny-a``, ``tiny-b``, ``tiny-c`` and ``tiny-a.gguf``."""

    def __init__(self, root: Path) -> None:
        from openpto.models import save_model
        from openpto.pipeline.export import export_artifact
        from openpto.store import Store
        from tests.helpers import tiny_llama

        self.root = root
        self.folders: dict[str, Path] = {}
        for seed, name in enumerate(["tiny-a", "tiny-b", "tiny-c"], start=1):
            model = tiny_llama(seed=seed)
            for param in model.parameters():
                if param.dim() == 2:
                    param.data.mul_(8.0)
            self.folders[name] = save_model(model, chat_tokenizer(), root / name)
        self.gguf = root / "tiny-a.gguf"
        export_artifact(self.folders["tiny-a"], "gguf", self.gguf, "f16",
                        store=Store(root / "export.db"))

    def greedy(self, spec: str | Path, messages: list[dict[str, str]] | None = None,
               prompt: str | None = None, max_tokens: int = 12) -> str:
        """What the server must answer: the model loaded as the server loads it, batch 1."""
        engine = TorchEngine(str(spec), EngineOptions(threads=1))
        engine.load()
        try:
            text = prompt if messages is None else engine.chat_prompt(messages)
            assert text is not None
            ids = engine.tokenize(text)
            return generate_text(engine._model, engine._tokenizer, ids,
                                 SamplingParams(max_tokens=max_tokens)).text
        finally:
            engine.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("pool-models"))


class Server:
    def __init__(self, background: BackgroundServer, app: Any, store_root: Path) -> None:
        self.url = background.url
        self.app = app
        self.store_root = store_root
        self.client = ollama.Client(host=self.url)

    @property
    def pool(self) -> Any:
        return self.app.state.service.pool

    def ps(self) -> list[str]:
        return sorted(m.model for m in self.client.ps().models)

    def wait_unloaded(self, name: str) -> None:
        """ps hides an expired model at once; its engine closes on the sweeper task."""
        deadline = time.monotonic() + 30
        while any(k.startswith(name) for k in self.pool._loaded) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(k.startswith(name) for k in self.pool._loaded)


def start_server(tmp: Path, **settings: Any) -> tuple[BackgroundServer, Server]:
    engine = TorchEngine.from_model(varied_tiny_model(), chat_tokenizer(), MAIN,
                                    EngineOptions(max_batch=2, threads=1))
    store_root = tmp / "ollama"
    # A JSON body limit far below the GGUF's size: uploads stream past it.
    config = ServerSettings(models_dir=store_root, serve_local_models=False,
                            max_request_bytes=65_536, **settings)
    app = create_app(config, engine, access_sink=None, options=EngineOptions(threads=1))
    background = BackgroundServer(app)
    background.start()
    return background, Server(background, app, store_root)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("pool-server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPT_DB", str(tmp / "opt.db"))
        background, served = start_server(tmp)
        try:
            yield served
        finally:
            background.stop()


# -- pure helpers ----------------------------------------------------------------------------------


def test_keep_alive_and_sizes_parse_as_ollama_and_people_write_them() -> None:
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400
    assert parse_keep_alive("250ms") == 0.25 and parse_keep_alive(30) == 30
    assert parse_keep_alive(0) == 0 and parse_keep_alive("0") == 0
    assert parse_keep_alive(-1) == FOREVER and parse_keep_alive("-1m") == FOREVER
    assert parse_keep_alive(None) is None
    assert parse_bytes("2GB") == 2_000_000_000 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1000") == 1000 and parse_bytes("1.5G") == 1_500_000_000
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_parameter_size_is_written_as_ollama_writes_it() -> None:
    # Ollama's format.HumanNumber: no decimals from 100 up, one from 10, two below.
    assert human_number(134_515_008) == "135M"
    assert human_number(7_241_732_096) == "7.24B"
    assert human_number(1_500_000_000) == "1.5B"
    assert human_number(8_000_000_000) == "8B"
    assert human_number(28_311_552) == "28.3M"
    assert human_number(106_816) == "107K" and human_number(999) == "999"


# -- create from a blob, chat, copy, delete ------------------------------------------------------


def test_create_from_an_uploaded_gguf_then_chat_with_it(server: Server, models: Models) -> None:
    client = server.client
    digest = client.create_blob(models.gguf)
    assert digest == "sha256:" + hashlib.sha256(models.gguf.read_bytes()).hexdigest()
    assert httpx.head(f"{server.url}/api/blobs/{digest}").status_code == 200
    assert httpx.head(f"{server.url}/api/blobs/sha256:{'0' * 64}").status_code == 404
    progress = list(client.create(model="mine", files={"tiny-a.gguf": digest},
                                  system="Be brief.", template="{{ .Prompt }}",
                                  license="MIT", parameters={"stop": ["<|never|>"]},
                                  stream=True))
    statuses = [p.status for p in progress]
    assert statuses[-1] == "success" and "writing manifest" in statuses
    assert any(digest in (s or "") for s in statuses)

    question = [{"role": "user", "content": "Tell me about lists"}]
    reply = client.chat(model="mine", messages=question, options=GREEDY)
    # The stored system prompt goes first, as Ollama puts a Modelfile's SYSTEM.
    expected = models.greedy(models.gguf, [{"role": "system", "content": "Be brief."},
                                           *question])
    assert reply.message.content == expected and reply.model == "mine:latest"

    shown = client.show("mine")
    assert shown.template == "{{ .Prompt }}" and shown.license == "MIT"
    assert 'PARAMETER stop' in (shown.modelfile or "") and '"<|never|>"' in shown.parameters
    backend = "llamacpp" if _has_llama_cpp() else "torch"
    assert shown.details.format == "gguf"
    assert shown.details.parameter_size == human_number(_gguf_parameters(models.gguf))
    raw = httpx.post(server.url + "/api/show", json={"model": "mine"}).json()
    assert raw["details"]["backend"] == backend and raw["system"] == "Be brief."
    ps = httpx.get(server.url + "/api/ps").json()["models"]
    mine = next(m for m in ps if m["name"] == "mine:latest")
    assert mine["details"]["backend"] == backend and mine["size"] == tiny_size()
    assert mine["size_vram"] == 0  # on the CPU
    assert "mine:latest" in [m.model for m in client.list().models]
    ids = [m.id for m in openai.OpenAI(base_url=server.url + "/v1", api_key="-").models.list()]
    assert ids[0] == MAIN and "mine:latest" in ids


def test_copy_and_delete(server: Server, models: Models) -> None:
    client = server.client
    digest = client.create_blob(models.gguf)
    client.create(model="to-copy:v1", files={"tiny-a.gguf": digest}, system="Hi.")
    assert client.copy("to-copy:v1", "copied").status == "success"
    shown = httpx.post(server.url + "/api/show", json={"model": "copied"}).json()
    assert shown["system"] == "Hi."
    names = [m.model for m in client.list().models]
    assert "to-copy:v1" in names and "copied:latest" in names
    assert client.delete("copied").status == "success"
    assert "copied:latest" not in [m.model for m in client.list().models]
    server.wait_unloaded("copied")
    with pytest.raises(ollama.ResponseError) as caught:
        client.delete("copied")
    assert caught.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as caught:
        client.copy("no-such-model", "x")
    assert caught.value.status_code == 404
    assert "to-copy:v1" in [m.model for m in client.list().models]  # the source is untouched


# -- several models, keep_alive ------------------------------------------------------------------


def test_pull_of_local_folders_and_two_models_loaded_at_once(server: Server,
                                                               models: Models) -> None:
    client = server.client
    for name in ("tiny-a", "tiny-b"):
        statuses = [p.status for p in client.pull(str(models.folders[name]), stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert client.pull("tiny-a").status == "success"  # already here: nothing to do
    a = client.generate(model="tiny-a", prompt="def f(x):", raw=True, options=GREEDY)
    b = client.generate(model="tiny-b:latest", prompt="def f(x):", raw=True, options=GREEDY)
    again = client.generate(model="tiny-a", prompt="def f(x):", raw=True, options=GREEDY)
    # Loading is counted in the request that needed it, as Ollama's load_duration is.
    assert a.load_duration > again.load_duration and a.load_duration > 10**6
    assert again.response == a.response
    assert a.response == models.greedy(models.folders["tiny-a"], prompt="def f(x):")
    assert b.response == models.greedy(models.folders["tiny-b"], prompt="def f(x):")
    assert a.response != b.response
    loaded = server.ps()
    assert {"tiny-a:latest", "tiny-b:latest", MAIN} <= set(loaded)
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("llama3.2")
    assert caught.value.status_code == 404 and "network" in caught.value.error


def test_keep_alive_zero_unloads_at_once_and_forever_keeps(server: Server,
                                                           models: Models) -> None:
    client = server.client
    client.pull(str(models.folders["tiny-c"]))
    client.generate(model="tiny-c", prompt="x", raw=True, options=GREEDY, keep_alive="10m")
    entry = next(m for m in client.ps().models if m.model == "tiny-c:latest")
    left = (entry.expires_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 590 < left <= 600
    client.generate(model="tiny-c", prompt="x", raw=True, options=GREEDY, keep_alive=0)
    assert "tiny-c:latest" not in server.ps()
    server.wait_unloaded("tiny-c")
    # An empty prompt with keep_alive loads (or unloads) without generating, as in Ollama.
    client.generate(model="tiny-c", keep_alive=-1)
    entry = next(m for m in client.ps().models if m.model == "tiny-c:latest")
    assert entry.expires_at.year > 2300
    client.generate(model="tiny-c", keep_alive=0)
    server.wait_unloaded("tiny-c")
    # The server's own model stays loaded whatever a request says.
    client.generate(model=MAIN, prompt="x", options=GREEDY, keep_alive=0)
    assert MAIN in server.ps()


def test_memory_budget_unloads_the_least_recently_used(tmp_path: Path, models: Models,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPT_DB", str(tmp_path / "opt.db"))
    size = tiny_size()
    # Room for the server's own model and two more, not three.
    background, served = start_server(tmp_path, memory_budget=int(size * 3.5))
    try:
        client = served.client
        for name in ("tiny-a", "tiny-b", "tiny-c"):
            client.pull(str(models.folders[name]))
        client.generate(model="tiny-a", prompt="x", raw=True, options=GREEDY)
        client.generate(model="tiny-b", prompt="x", raw=True, options=GREEDY)
        client.generate(model="tiny-a", prompt="y", raw=True, options=GREEDY)  # a is newer now
        client.generate(model="tiny-c", prompt="x", raw=True, options=GREEDY)
        assert served.ps() == sorted([MAIN, "tiny-a:latest", "tiny-c:latest"])
        assert sum(m.size for m in client.ps().models) <= size * 3.5
    finally:
        background.stop()


def test_max_loaded_unloads_the_least_recently_used(tmp_path: Path, models: Models,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPT_DB", str(tmp_path / "opt.db"))
    background, served = start_server(tmp_path, max_loaded=2)
    try:
        client = served.client
        for name in ("tiny-a", "tiny-b"):
            client.pull(str(models.folders[name]))
        client.generate(model="tiny-a", prompt="x", raw=True, options=GREEDY)
        assert served.ps() == sorted([MAIN, "tiny-a:latest"])
        client.generate(model="tiny-b", prompt="x", raw=True, options=GREEDY)
        assert served.ps() == sorted([MAIN, "tiny-b:latest"])
    finally:
        background.stop()
    background, served = start_server(tmp_path, max_loaded=1)
    try:  # the server's own model stays, so nothing else fits: said at once
        served.client.pull(str(models.folders["tiny-a"]))
        with pytest.raises(ollama.ResponseError) as caught:
            served.client.generate(model="tiny-a", prompt="x")
        assert caught.value.status_code == 503 and "--max-loaded" in caught.value.error
        assert served.ps() == [MAIN]
    finally:
        background.stop()


def test_a_model_with_a_request_running_is_not_unloaded(tmp_path: Path, models: Models,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setenv("OPT_DB", str(tmp_path / "opt.db"))
    background, served = start_server(tmp_path, max_loaded=2)
    try:
        client = served.client
        for name in ("tiny-a", "tiny-b"):
            client.pull(str(models.folders[name]))
        long = {"temperature": 0, "num_predict": 900}
        parts = client.generate(model="tiny-a", prompt="x", raw=True, options=long, stream=True)
        first = next(parts)
        replies: list[Any] = []
        other = threading.Thread(target=lambda: replies.append(ollama.Client(
            host=served.url).generate(model="tiny-b", prompt="x", raw=True, options=GREEDY)))
        other.start()
        # tiny-b's load waits for room (the lock is held) while tiny-a generates.
        deadline = time.monotonic() + 30
        while not served.pool._load_lock.locked() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert served.pool._load_lock.locked() and "tiny-a:latest" in served.pool._loaded
        rest = list(parts)
        other.join(timeout=120)
        assert rest[-1].done_reason == "length" and rest[-1].eval_count == 900
        assert first.response + "".join(p.response for p in rest)
        assert replies and replies[0].eval_count == GREEDY["num_predict"]
        assert served.ps() == sorted([MAIN, "tiny-b:latest"])
    finally:
        background.stop()


# -- bad input -------------------------------------------------------------------------------------


def test_blob_whose_content_does_not_match_its_digest_is_not_stored(server: Server) -> None:
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    response = httpx.post(f"{server.url}/api/blobs/{wrong}", content=b"GGUF and more")
    assert response.status_code == 400 and "digest mismatch" in response.json()["error"]
    blobs = server.store_root / "blobs"
    assert not (blobs / wrong.replace(":", "-")).exists()
    assert not [p for p in blobs.iterdir() if p.name.startswith(".upload-")]
    response = httpx.post(f"{server.url}/api/blobs/md5:1234", content=b"x")
    assert response.status_code == 400 and "sha256" in response.json()["error"]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "x\\y", "ok/../../etc"])
def test_model_names_are_not_paths(server: Server, name: str) -> None:
    for path, body in [("/api/create", {"model": name, "from": MAIN}),
                       ("/api/copy", {"source": MAIN, "destination": name})]:
        response = httpx.post(server.url + path, json=body)
        assert response.status_code == 400, (path, response.text)
        assert "names are not paths" in response.json()["error"]
    response = httpx.request("DELETE", server.url + "/api/delete", json={"model": name})
    assert response.status_code == 400
    assert not list((server.store_root / "manifests").rglob("*evil*"))


def test_corrupt_gguf_is_refused_and_nothing_is_loaded(server: Server) -> None:
    client = server.client
    junk = b"GGUF" + bytes(range(256)) * 8
    digest = "sha256:" + hashlib.sha256(junk).hexdigest()
    assert httpx.post(f"{server.url}/api/blobs/{digest}", content=junk).status_code == 201
    before = server.ps()
    with pytest.raises(ollama.ResponseError) as caught:
        client.create(model="broken", files={"broken.gguf": digest})
    assert caught.value.status_code == 400 and "GGUF" in caught.value.error
    assert "broken:latest" not in [m.model for m in client.list().models]
    assert server.ps() == before
    with pytest.raises(ollama.ResponseError) as caught:  # a blob that was never uploaded
        client.create(model="broken", files={"m.gguf": "sha256:" + "1" * 64})
    assert caught.value.status_code == 400 and "upload it first" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="mine", prompt="x", keep_alive="soon")
    assert caught.value.status_code == 400 and "keep_alive" in caught.value.error


def test_recreate_reloads_and_delete_stops_serving(server: Server, models: Models) -> None:
    client = server.client
    client.create(model="moving", from_=str(models.folders["tiny-a"]))
    first = client.generate(model="moving", prompt="def f(x):", raw=True, options=GREEDY)
    assert first.response == models.greedy(models.folders["tiny-a"], prompt="def f(x):")
    client.create(model="moving", from_=str(models.folders["tiny-b"]))  # loaded: replaced
    second = client.generate(model="moving", prompt="def f(x):", raw=True, options=GREEDY)
    assert second.response == models.greedy(models.folders["tiny-b"], prompt="def f(x):")
    client.delete("moving")
    assert "moving:latest" not in server.ps()
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="moving", prompt="x")
    assert caught.value.status_code == 404


def test_create_refuses_what_it_cannot_keep(server: Server) -> None:
    client = server.client
    cases = [
        (dict(model="p", from_=MAIN, parameters={"temperature": "hot"}), "parameters.temperature"),
        (dict(model=MAIN, from_="tiny-a"), "started with"),
        (dict(model="q", from_=MAIN, quantize="q4_K_M"), "opt quantize"),
        (dict(model="r"), "files"),
        (dict(model="s", from_="/no/such/folder"), "not found"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ollama.ResponseError) as caught:
            client.create(**kwargs)  # type: ignore[arg-type]
        assert caught.value.status_code in (400, 404) and message in caught.value.error, kwargs
    with pytest.raises(ollama.ResponseError) as caught:
        client.push("mine")
    assert caught.value.status_code == 400 and "registry" in caught.value.error
    names = [m.model for m in client.list().models]
    assert not {"p:latest", "q:latest", "r:latest", "s:latest"} & set(names)


def test_gguf_the_torch_path_cannot_read_names_the_llamacpp_extra(server: Server,
                                                                   tmp_path: Path) -> None:
    if _has_llama_cpp():
        pytest.skip("llama.cpp is installed: it serves GGUF files itself")
    import gguf
    import numpy as np

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(path, "rwkv6")  # a whole GGUF file transformers does not read
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    client = server.client
    client.create(model="odd", files={"rwkv.gguf": client.create_blob(path)})
    before = server.ps()
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="odd", prompt="x")
    assert caught.value.status_code == 400
    assert "rwkv6" in caught.value.error and "openpto[llamacpp]" in caught.value.error
    assert server.ps() == before and "odd:latest" not in server.pool._loaded
    client.delete("odd")


def test_json_bodies_whatever_the_content_type(server: Server) -> None:
    """``curl -d '{...}'`` sends application/x-www-form-urlencoded; the body is still JSON."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = {"model": MAIN, "prompt": "x", "stream": False, "options": GREEDY}
    response = httpx.post(server.url + "/api/generate", content=json.dumps(body), headers=form)
    assert response.status_code == 200 and response.json()["eval_count"] > 0
    chat = {"model": MAIN, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
    for headers in (form, {"Content-Type": "text/plain"}, {}):
        response = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(chat),
                              headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
    response = httpx.post(server.url + "/api/generate", content=b"model=x", headers=form)
    assert response.status_code == 400 and "JSON" in response.json()["error"]


def test_serve_flags_are_checked_before_starting(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "openpto", "serve", "--memory-budget", "lots", "--port", "0"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not a size" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_opt_serve_process_with_pool_flags(tmp_path: Path, models: Models) -> None:
    """The real ``opt serve`` with --max-loaded and --keep-alive, driven by the client."""
    import os
    import signal

    from openpto.serving.background import free_port

    port = free_port()
    env = {**os.environ, "OPT_HOME": str(tmp_path / "home"), "OPT_DB": str(tmp_path / "opt.db"),
           "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "openpto", "serve", str(models.folders["tiny-a"]), "--port",
         str(port), "--max-loaded", "2", "--keep-alive", "1s", "--threads", "1", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["url"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        client = ollama.Client(host=url)
        client.pull(str(models.folders["tiny-b"]))
        reply = client.generate(model="tiny-b", prompt="def f(x):", raw=True, options=GREEDY)
        assert reply.response == models.greedy(models.folders["tiny-b"], prompt="def f(x):")
        assert sorted(m.model for m in client.ps().models) == ["tiny-a", "tiny-b:latest"]
        deadline = time.monotonic() + 30  # --keep-alive 1s: tiny-b goes, tiny-a stays
        while len(client.ps().models) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [m.model for m in client.ps().models] == ["tiny-a"]
        assert (tmp_path / "home" / "ollama" / "manifests" / "tiny-b" / "latest.json").is_file()
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err


# -- the real default model ----------------------------------------------------------------------


@pytest.mark.integration
def test_default_model_parameter_size_is_what_ollama_reports(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    monkeypatch.setenv("OPT_DB", str(tmp_path / "opt.db"))
    engine = TorchEngine(None, EngineOptions(threads=1))
    app = create_app(ServerSettings(models_dir=tmp_path / "ollama"), engine, access_sink=None)
    with BackgroundServer(app) as background:
        shown = ollama.Client(host=background.url).show("smollm2-135m")
        # Ollama lists smollm2:135m as 135M: every tensor counted once, the tied embedding too.
        assert shown.details.parameter_size == "135M"
        assert shown.modelinfo["general.parameter_count"] == 134_515_008
        assert shown.details.format == "gguf" and shown.details.quantization_level == "Q4_1"


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _gguf_parameters(path: Path) -> int:
    import gguf

    return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
