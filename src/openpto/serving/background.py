"""Run an app under uvicorn on a background thread (tests, benchmarks, notebooks).

    with BackgroundServer(create_app(settings, engine)) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="-")...
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

from openpto.errors import BackendUnavailable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class BackgroundServer:
    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None,
                 wait_ready: bool = True, timeout: float = 300.0) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.wait_ready = wait_ready
        self.timeout = timeout
        config = uvicorn.Config(app, host=host, port=self.port, access_log=False,
                                log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="opt-uvicorn", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        import httpx

        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise BackendUnavailable(f"the server on {self.url} stopped while starting")
            try:
                response = httpx.get(self.url + "/health", timeout=2)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            status = response.status_code
            if status == 503 and response.json().get("status") == "failed":
                self.stop()
                raise BackendUnavailable(f"the model did not load: {response.json()['error']}")
            if status == 200 or (status == 503 and not self.wait_ready):
                return
            time.sleep(0.05)
        self.stop()
        raise BackendUnavailable(f"the server on {self.url} was not ready in {self.timeout:.0f} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
