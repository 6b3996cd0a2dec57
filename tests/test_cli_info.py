"""``opt info``: one JSON object with the contract's keys, tables for people, a recorded run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openpto.store import Store
from tests.helpers import run_opt


def test_info_json(tmp_db: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_opt(["info", "--json"], capsys, monkeypatch)
    assert code == 0
    assert out.count("\n") == 1  # exactly one JSON object on stdout
    info = json.loads(out)
    assert {"python", "torch", "devices", "backends", "run_id"} <= info.keys()
    assert info["devices"][0]["type"] == "cpu"
    for device in info["devices"]:
        assert {"type", "name", "memory_bytes"} <= device.keys()
        assert device["memory_bytes"] > 0
    for name in ("torch-cpu-int4", "cuda", "triton", "bitsandbytes", "llama-cpp-python",
                 "compressed-tensors", "datasette", "fastapi+uvicorn", "textual", "mlx"):
        assert {"available", "reason"} <= info["backends"][name].keys(), name

    store = Store()
    [run] = store.query_readonly("select id, kind, status from runs")
    assert run == {"id": info["run_id"], "kind": "info", "status": "succeeded"}
    [trace] = store.query_readonly("select name, attributes from traces")
    assert trace["name"] == "hardware"
    assert json.loads(trace["attributes"])["torch"] == info["torch"]


def test_info_tables(tmp_db: Path, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_opt(["info"], capsys, monkeypatch)
    assert code == 0
    for word in ("machine", "devices", "backends", "torch-cpu-int4", "fastapi+uvicorn"):
        assert word in out
    # pip hints are printed literally, not eaten as Rich markup
    from openpto.hardware import backends

    missing = [s["reason"] for s in backends().values() if "openpto[" in s["reason"]]
    for reason in missing:
        assert reason.split(": ", 1)[1] in out


def test_info_help_has_an_example(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_opt(["info", "--help"], capsys, monkeypatch)
    assert code == 0 and "Example: opt info --json" in out


def test_info_lists_every_quantization_backend(tmp_db: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from openpto.pipeline.backends.quanto import QuantoBackend

    # One backend unavailable, with a pip hint, whatever this machine has installed.
    reason = "optimum-quanto is not installed: pip install 'openpto[backends]'"
    monkeypatch.setattr(QuantoBackend, "availability", lambda self: (False, reason))
    code, out, _ = run_opt(["info", "--json"], capsys, monkeypatch)
    assert code == 0
    quant = json.loads(out)["quantization_backends"]
    assert set(quant) == {"torch", "bitsandbytes", "quanto", "mlx"}
    assert quant["quanto"] == {"available": False, "reason": reason}
    assert quant["torch"]["available"] is True and "torch" in quant["torch"]["reason"]
    [trace] = Store().query_readonly("select attributes from traces")
    assert json.loads(trace["attributes"])["quantization_backends"] == quant

    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_opt(["info"], capsys, monkeypatch)
    assert code == 0
    table = out[out.index("quantization backends"):]
    for name in quant:
        assert name in table
    assert reason in table  # the hint survives Rich markup
    assert quant["torch"]["reason"] in table
