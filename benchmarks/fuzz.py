"""Fuzz ``opt serve`` with schemathesis: every route of its OpenAPI schema, with and without a key.

Starts ``opt serve`` in a subprocess on a tiny random model (with an API key, prompt logging on
and a small ``--max-tokens-limit`` so that each generated request stays short), then, for each
operation of the app's OpenAPI schema, sends ``--max-examples`` requests that schemathesis
generates from the schema (valid and invalid bodies, parameters and headers) with the key, and
``--max-examples-no-key`` more without it. A request fails on any 5xx but the documented 503
(model not loaded), or on a transport error (the server closed the connection or hung). The
server must still answer ``/health`` with 200 afterwards. Prints a table and writes JSON.

The schema comes from the app itself (``create_app(...).openapi()``): a server with a key does
not serve ``/openapi.json``, by design.

    .venv/bin/python benchmarks/fuzz.py --max-examples 200 --json benchmarks/results/fuzz.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# 503 is documented for every model route: the model is still loading, or failed to load.
DOCUMENTED_5XX = {503}


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    operations: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "operations": self.operations,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "failures": len(self.failures), "failure_examples": self.failures[:20]}


def tiny_model_folder(folder: Path) -> Path:
    """A tiny random Llama with a chat template, saved for ``opt serve``."""
    from tests.helpers import tiny_llama
    from tests.test_serving import chat_tokenizer

    tiny_llama().save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


def app_schema(model_folder: Path) -> dict[str, Any]:
    """The OpenAPI document of the app that ``opt serve`` runs (nothing is loaded for it)."""
    from openpto.engines.engine import EngineOptions, make_engine
    from openpto.serving.app import create_app
    from openpto.serving.settings import ServerSettings

    engine = make_engine("torch", str(model_folder), EngineOptions())
    schema: dict[str, Any] = create_app(ServerSettings(), engine, access_sink=None).openapi()
    return schema


def pin_model_name(schema: dict[str, Any], name: str) -> dict[str, Any]:
    """Every ``model`` field and ``model_id`` parameter names the served model, so generated
    requests reach the model routes' own validation and decoding instead of stopping at 404."""
    pinned = json.loads(json.dumps(schema))
    for component in pinned.get("components", {}).get("schemas", {}).values():
        properties = component.get("properties", {})
        for key in ("model", "name"):
            if key in properties:
                properties[key] = {"type": "string", "enum": [name]}
    for methods in pinned.get("paths", {}).values():
        for operation in methods.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "model_id":
                    parameter["schema"] = {"type": "string", "enum": [name]}
    return pinned


class ServeProcess:
    """``opt serve MODEL`` in a subprocess, with its stderr in a file."""

    def __init__(self, model: Path, db: Path, key: str | None, log: Path,
                 extra: list[str] | None = None, max_tokens_limit: int = 16) -> None:
        from openpto.serving.background import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        args = [sys.executable, "-m", "openpto", "serve", str(model), "--port", str(self.port),
                "--max-batch", "4", "--max-tokens-limit", str(max_tokens_limit),
                *(extra or [])]
        env = {**os.environ, "OPT_DB": str(db), "HF_HUB_OFFLINE": "1", "OPT_API_KEY": key or ""}
        self._log_handle = log.open("w")
        self.process = subprocess.Popen(args, env=env, stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 240) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"opt serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("opt serve was not ready in time")

    def alive(self) -> bool:
        import httpx

        try:
            healthy = httpx.get(self.url + "/health", timeout=10).status_code == 200
        except httpx.TransportError:
            return False
        return self.process.poll() is None and healthy

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_handle.close()
        return self.process.returncode


def fuzz(schema: dict[str, Any], url: str, headers: dict[str, str], max_examples: int,
         report: FuzzReport, seed: int = 0) -> FuzzReport:
    """Send schemathesis' generated requests for every operation; record statuses and failures."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    loaded = schemathesis.openapi.from_dict(schema)
    session = requests.Session()
    def sender(operation: Any) -> Any:
        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def send(case: Any) -> None:
            report.requests += 1
            try:
                response = case.call(base_url=url, session=session, headers=headers, timeout=60)
            except requests.RequestException as exc:
                report.failures.append({"operation": operation.label, "error": repr(exc)[:300]})
                return
            status = response.status_code
            report.statuses[status] += 1
            if status >= 500 and status not in DOCUMENTED_5XX:
                report.failures.append({"operation": operation.label, "status": status,
                                        "body": response.text[:300],
                                        "request": repr(case.body)[:500]})

        return send

    for result in loaded.get_all_operations():
        report.operations += 1
        sender(result.ok())()
    return report


def run(max_examples: int, max_examples_no_key: int, workdir: Path) -> dict[str, Any]:
    model = tiny_model_folder(workdir / "tiny-model")
    key = "fuzz-" + os.urandom(12).hex()
    server = ServeProcess(model, workdir / "opt.db", key, workdir / "serve.log",
                          extra=["--log-prompts"])
    try:
        server.wait_ready()
        schema = pin_model_name(app_schema(model), model.name)
        with_key = fuzz(schema, server.url, {"Authorization": f"Bearer {key}"}, max_examples,
                        FuzzReport())
        without_key = fuzz(schema, server.url, {}, max_examples_no_key, FuzzReport())
        alive = server.alive()
    finally:
        code = server.stop()
    return {"with_key": with_key.as_dict(), "without_key": without_key.as_dict(),
            "alive_after": alive, "exit_code": code, "key": key,
            "log": str(workdir / "serve.log")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-examples", type=int, default=200,
                        help="generated requests per operation, with the key")
    parser.add_argument("--max-examples-no-key", type=int, default=20,
                        help="generated requests per operation, without the key")
    parser.add_argument("--json", type=Path, default=None, help="default: results/fuzz.json")
    args = parser.parse_args()
    import harness  # type: ignore[import-not-found]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="opt-fuzz-") as tmp:
        result = run(args.max_examples, args.max_examples_no_key, Path(tmp))
        result.pop("key")
        result.pop("log")
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{'':12} {'ops':>4} {'requests':>9} {'failures':>9}  statuses")
    for name in ("with_key", "without_key"):
        part = result[name]
        print(f"{name:12} {part['operations']:>4} {part['requests']:>9} {part['failures']:>9}  "
              f"{part['statuses']}")
    print(f"server alive afterwards: {result['alive_after']}; {result['seconds']} s")
    print("wrote", harness.write_json(args.json or harness.result_path("fuzz"), result))
    if result["with_key"]["failures"] or result["without_key"]["failures"] \
            or not result["alive_after"]:
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
