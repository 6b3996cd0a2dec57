"""The official ``ollama`` client against one host, with our errors.

``opt ollama list|ps|show|pull|delete|copy|chat|generate|embed`` call these; each returns the
client's response as a plain dict (what ``--json`` prints). The host is ``--host``, else
``OLLAMA_HOST``, else ``127.0.0.1:11434``, written as Ollama accepts it (``host``, ``host:port``
or a URL). Nothing answering there is one ``OllamaUnreachable`` line; an error the server
reports is an ``OptError`` with its message and status.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from openpto.errors import OptError, UsageError, require

DEFAULT_HOST = "127.0.0.1:11434"


class OllamaUnreachable(OptError):
    """Nothing answers at the Ollama host."""


def host_url(host: str | None = None) -> str:
    """``http://host:port`` for ``host`` (or ``OLLAMA_HOST``, or the default)."""
    raw = (host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST).strip()
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"not an Ollama host: {host!r} (give host, host:port or a URL)")
    port = parts.port or (443 if parts.scheme == "https" else 11434)
    name = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{name}:{port}{parts.path.rstrip('/')}"


def client(host: str | None = None) -> Any:
    ollama: Any = require("ollama", "serve", "opt ollama")
    return ollama.Client(host=host_url(host))


@contextmanager
def reported(url: str) -> Iterator[None]:
    """The client's failures as one clear line naming the host."""
    import httpx
    import ollama

    try:
        yield
    except (ConnectionError, httpx.ConnectError) as exc:
        raise OllamaUnreachable(
            f"nothing answers at {url}: start Ollama (ollama serve) or opt serve there, "
            "or pass --host") from exc
    except httpx.TransportError as exc:
        raise OllamaUnreachable(f"nothing answers at {url}: {exc}") from exc
    except ollama.ResponseError as exc:
        raise OptError(f"{url}: {exc.error} (HTTP {exc.status_code})") from exc


def plain(response: Any) -> Any:
    """A client response (pydantic) as JSON-ready data."""
    dump = getattr(response, "model_dump", None)
    return dump(mode="json", exclude_none=True) if dump is not None else response


def call(host: str | None, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One non-streaming client call, as a dict with the host added."""
    url = host_url(host)
    with reported(url):
        result = plain(getattr(client(url), method)(*args, **kwargs))
    out = result if isinstance(result, dict) else {"result": result}
    return {**out, "host": url}


def stream(host: str | None, method: str, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """A streaming client call's chunks as dicts (errors as for ``call``)."""
    url = host_url(host)
    with reported(url):
        for chunk in getattr(client(url), method)(*args, stream=True, **kwargs):
            yield plain(chunk)


def chat_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]


def collect_text(chunks: Iterator[dict[str, Any]], on_text: Callable[[str], None],
                 text_of: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Pass each chunk's text to ``on_text``; the last chunk with the whole text in it."""
    pieces: list[str] = []
    last: dict[str, Any] = {}
    for chunk in chunks:
        piece = text_of(chunk)
        if piece:
            pieces.append(piece)
            on_text(piece)
        last = chunk
    last["text"] = "".join(pieces)
    return last


def chat(host: str | None, model: str, prompt: str, system: str | None = None,
         options: dict[str, Any] | None = None,
         on_text: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    chunks = stream(host, "chat", model, messages=chat_messages(prompt, system), options=options)
    last = collect_text(chunks, on_text, lambda c: str((c.get("message") or {}).get("content")
                                                       or ""))
    last.setdefault("message", {})["content"] = last["text"]
    return {**last, "host": host_url(host)}


def generate(host: str | None, model: str, prompt: str, system: str | None = None,
             options: dict[str, Any] | None = None,
             on_text: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    chunks = stream(host, "generate", model, prompt=prompt, system=system, options=options)
    last = collect_text(chunks, on_text, lambda c: str(c.get("response") or ""))
    last["response"] = last["text"]
    last.pop("context", None)  # thousands of token ids nobody reads
    return {**last, "host": host_url(host)}


def pull(host: str | None, model: str,
         on_progress: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    last: dict[str, Any] = {}
    for chunk in stream(host, "pull", model):
        on_progress(chunk)
        last = chunk
    if last.get("status") != "success":
        raise OptError(f"pull of {model} ended with {last.get('status')!r}")
    return {"model": model, "status": "success", "host": host_url(host)}


def sampling_options(temperature: float | None, top_p: float | None, seed: int | None,
                     num_predict: int | None) -> dict[str, Any] | None:
    values = {"temperature": temperature, "top_p": top_p, "seed": seed,
              "num_predict": num_predict}
    chosen = {k: v for k, v in values.items() if v is not None}
    return chosen or None
