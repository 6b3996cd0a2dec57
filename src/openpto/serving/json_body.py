"""Request bodies are JSON whatever the Content-Type header says.

``curl -d '{...}'`` sends ``application/x-www-form-urlencoded`` (Ollama's own documentation writes
its examples that way), and FastAPI would then hand the body to validation as bytes. Both API
families take only JSON bodies, so the header is set to JSON before routing; blob uploads, whose
body is a file, are left as they are.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

_JSON = (b"content-type", b"application/json")


class JSONBodies:
    def __init__(self, app: ASGIApp, raw_prefixes: tuple[str, ...] = ("/api/blobs/",)) -> None:
        self.app = app
        self.raw_prefixes = raw_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH", "DELETE")
                and not str(scope["path"]).startswith(self.raw_prefixes)):
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            # In place: the access log reads the matched route back from this same scope.
            scope["headers"] = [*headers, _JSON]
        await self.app(scope, receive, send)
