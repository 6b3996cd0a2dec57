"""ASGI middleware: the request size limit and structured access logs.

Both are plain ASGI (not ``BaseHTTPMiddleware``) so that streaming responses pass through
untouched and a client disconnect still reaches the route.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openpto.serving.errors import error_body

LogSink = Callable[[dict[str, Any]], None]


def stderr_json(record: dict[str, Any]) -> None:
    sys.stderr.write(json.dumps(record, default=str) + "\n")
    sys.stderr.flush()


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """413 for bodies over ``max_bytes``: at once from Content-Length, else while reading.

    The body is read here in full (it is at most ``max_bytes``) and replayed to the app, so the
    app never sees a truncated request; later ``receive`` calls (disconnect) pass through.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, streamed_prefixes: tuple[str, ...] = ()
                 ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # Routes that stream their body (blob uploads) and enforce their own limit.
        self.streamed_prefixes = streamed_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS")
                or str(scope["path"]).startswith(self.streamed_prefixes)):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        message = f"the request body is larger than this server's limit of {self.max_bytes} bytes"
        await _send_json(send, 413, error_body(scope["path"], 413, message, "request_too_large"))


class AccessLog:
    """One JSON record per request after its response ends (streams included)."""

    def __init__(self, app: ASGIApp, sink: LogSink | None,
                 on_done: Callable[[str, str, int], None] | None = None) -> None:
        self.app = app
        self.sink = sink
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        sent = 0
        request_id = uuid.uuid4().hex[:16]

        async def watch(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            if self.on_done is not None:
                self.on_done(scope["method"], template, status)
            if self.sink is not None:
                client = scope.get("client")
                self.sink({
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                    "event": "http_request",
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "bytes_sent": sent,
                    "client": f"{client[0]}:{client[1]}" if client else None,
                })
