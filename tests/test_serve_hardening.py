"""``opt serve`` under generated input: schemathesis over every route with and without the key,
then the key itself looked for in everything the server wrote (its log and the database).

One real server process (a tiny random model, an API key, prompt logging on) serves the module;
the bounded fuzz here is the short version of ``benchmarks/fuzz.py`` (``make fuzz``).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("schemathesis")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import fuzz

KEY = "sk-opt-" + secrets.token_hex(16)  # new for every run


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[fuzz.ServeProcess]:
    workdir = tmp_path_factory.mktemp("hardening")
    model = fuzz.tiny_model_folder(workdir / "tiny-model")
    server = fuzz.ServeProcess(model, workdir / "opt.db", KEY, workdir / "serve.log",
                               extra=["--log-prompts"])
    server.model = model  # type: ignore[attr-defined]
    server.db = workdir / "opt.db"  # type: ignore[attr-defined]
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_fuzzing_every_route_finds_no_server_error(served: fuzz.ServeProcess) -> None:
    schema = fuzz.pin_model_name(fuzz.app_schema(served.model), served.model.name)  # type: ignore[attr-defined]
    assert len(schema["paths"]) >= 14  # the OpenAI, Ollama and operations routes
    with_key = fuzz.fuzz(schema, served.url, {"Authorization": f"Bearer {KEY}"}, 4,
                         fuzz.FuzzReport())
    without_key = fuzz.fuzz(schema, served.url, {}, 1, fuzz.FuzzReport())
    assert with_key.failures == [] and without_key.failures == []
    assert with_key.operations == len([m for p in schema["paths"].values() for m in p])
    assert with_key.statuses[200] > 0 and with_key.statuses[400] + with_key.statuses[422] > 0
    # Without the key only /health answers; everything else is refused before any work.
    assert set(without_key.statuses) <= {200, 401}
    assert without_key.statuses[401] >= without_key.requests - 1
    assert served.alive()


def test_the_key_is_in_no_log_trace_or_database_row(served: fuzz.ServeProcess) -> None:
    url, model = served.url, served.model.name  # type: ignore[attr-defined]
    auth = {"Authorization": f"Bearer {KEY}"}
    reply = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert reply.status_code == 200
    with httpx.stream("POST", url + "/api/generate", headers=auth, timeout=60, json={
            "model": model, "prompt": "hi", "options": {"num_predict": 4}}) as stream:
        assert stream.status_code == 200 and len(list(stream.iter_lines())) > 1
    near_miss = {"Authorization": f"Bearer {KEY[:-1]}x"}
    assert httpx.get(url + "/v1/models", headers=near_miss, timeout=10).status_code == 401
    assert httpx.get(url + "/metrics", headers=auth, timeout=10).status_code == 200
    assert served.stop() == 0

    written = [served.log, *Path(served.db).parent.glob("opt.db*")]  # type: ignore[attr-defined]
    for path in written:
        data = path.read_bytes()
        assert KEY.encode() not in data and KEY[:-1].encode() not in data, path
    db = sqlite3.connect(served.db)  # type: ignore[attr-defined]
    config, status = db.execute("select config, status from runs where kind = 'serve'").fetchone()
    assert status == "succeeded" and json.loads(config)["auth"] is True
    assert db.execute("select count(*) from prompts").fetchone()[0] > 0  # logging was on
    for table in ("runs", "metrics", "traces", "prompts"):
        for row in db.execute(f"select * from {table}"):
            assert KEY not in json.dumps(row, default=str), table
    log = served.log.read_text()
    assert '"status": 401' in log and '"path": "/v1/models"' in log  # the refusal was logged
