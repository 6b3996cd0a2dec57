"""Which OpenAI-compatible endpoint the agent talks to, and the built-in one.

In order: ``--base-url`` (with ``OPENAI_API_KEY`` from the environment, if set); else
``OPENAI_BASE_URL``; else ``OPENAI_API_KEY`` alone means OpenAI itself; else ``opt serve`` of the
default model, started in this process on a free loopback port with a random key of its own.

The key is read from the environment and kept only in ``Endpoint.api_key``, which ``repr`` and
``describe()`` leave out: nothing that is printed, stored or traced carries it.
"""

from __future__ import annotations

import importlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from openpto.errors import BackendUnavailable, UsageError

OPENAI_URL = "https://api.openai.com/v1"
#: sent where an endpoint needs no key (the openai client insists on some value)
NO_KEY = "no-key"


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str = field(default=NO_KEY, repr=False)
    builtin: bool = False  # our own server, started for this process

    @property
    def is_openai(self) -> bool:
        return urlparse(self.base_url).hostname == "api.openai.com"

    def describe(self) -> dict[str, Any]:
        """What may be shown and stored about the endpoint: never the key."""
        return {"base_url": self.base_url, "model": self.model, "builtin": self.builtin,
                "key_from_environment": not self.builtin and self.api_key != NO_KEY}


def external(base_url: str | None, model: str | None) -> Endpoint | None:
    """The endpoint the flags and the environment name, or None for the built-in server."""
    key = os.environ.get("OPENAI_API_KEY") or None
    url = base_url or os.environ.get("OPENAI_BASE_URL") or (OPENAI_URL if key else None)
    if url is None:
        return None
    if urlparse(url).scheme not in ("http", "https"):
        raise UsageError(f"--base-url must be an http(s) URL, not {url!r}")
    url = url.rstrip("/")
    return Endpoint(url, model or _default_model(url, key), key or NO_KEY)


def _default_model(url: str, key: str | None) -> str:
    """No --model: the SDK's default on OpenAI, else the endpoint's first listed model."""
    if urlparse(url).hostname == "api.openai.com":
        from agents.models.default_models import get_default_model

        return get_default_model()
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(url + "/models", headers=headers, timeout=10)
        response.raise_for_status()
        models = [m["id"] for m in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise BackendUnavailable(f"cannot list the models of {url} ({type(exc).__name__}); "
                                 "name one with --model") from None
    if not models:
        raise BackendUnavailable(f"{url} lists no models; name one with --model")
    return str(models[0])


@contextmanager
def builtin_server(model: str | None = None) -> Iterator[Endpoint]:
    """``opt serve`` of ``model`` (the default model when None) on a free loopback port, in a
    background thread of this process, for the block. It takes a random key, so that other
    local users cannot borrow it."""
    # Front ends never import each other statically (import-linter): the server is started here.
    serving = importlib.import_module("openpto.serving")
    background = importlib.import_module("openpto.serving.background")
    token = secrets.token_urlsafe(24)
    engine = serving.make_engine("torch", model, serving.EngineOptions())
    settings = serving.ServerSettings(host="127.0.0.1", api_key=token, access_log=False)
    app = serving.create_app(settings, engine, access_sink=None)
    with background.BackgroundServer(app) as server:
        yield Endpoint(server.url + "/v1", app.state.service.model_id, token, builtin=True)


@contextmanager
def open_endpoint(base_url: str | None, model: str | None) -> Iterator[Endpoint]:
    """The external endpoint, or the built-in server for the block."""
    found = external(base_url, model)
    if found is not None:
        yield found
        return
    with builtin_server(model) as endpoint:
        yield endpoint
