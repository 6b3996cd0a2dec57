"""``opt serve``: the OpenAI- and Ollama-compatible HTTP server."""

from __future__ import annotations

import importlib
import ipaddress
from pathlib import Path

import typer

from openpto.cli.common import JSON_HELP, emit, stderr
from openpto.errors import UsageError

MODEL_HELP = "Alias, folder, .gguf file, artifact or cached hub id (default smollm2-135m)."
DRAFT_HELP = ("Speculative draft for lone requests: a MODEL, self:int4, self:int8, "
              "self:layers=K or lookup[:N].")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)


def serve_cmd(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    backend: str = typer.Option("torch", help="torch, llamacpp or mlx."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: str | None = typer.Option(None, envvar="OPT_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' (not /health)."),
    api_key_file: Path | None = typer.Option(
        None, envvar="OPT_API_KEY_FILE",
        help="Read the API key from this file (a container secret); --api-key wins."),
    cors_origin: list[str] = typer.Option([], help="Allow this browser origin (repeatable)."),
    max_batch: int = typer.Option(8, min=1, help="Most sequences decoded together (torch)."),
    draft: str | None = typer.Option(None, help=DRAFT_HELP),
    log_prompts: bool = typer.Option(False, help="Record prompt/response pairs in the database."),
    max_tokens_limit: int = typer.Option(4096, min=1, help="Largest max_tokens a request may ask."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps (torch)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16 (torch)."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads for the model."),
    keep_alive: str = typer.Option("5m", help="Idle time before a model is unloaded: 5m, 30s, "
                                   "0 (at once), -1 (never); requests may set their own."),
    max_loaded: int = typer.Option(0, min=0, help="Most models loaded at once (0: no limit)."),
    memory_budget: str | None = typer.Option(None, help="Bytes the loaded models may take "
                                             "together, e.g. 2GB; LRU idle ones are unloaded."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " (once, when it starts)"),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth",
        help="Listen on a non-loopback address without an API key (anyone can use it)."),
) -> None:
    """Serve a model over OpenAI- and Ollama-compatible HTTP APIs until interrupted.

    Example: opt serve smollm2-135m --port 8000 --api-key secret --max-batch 8

    Other models (aliases, artifacts, models created with the Ollama API) load on first
    request. Example: opt serve --max-loaded 2 --memory-budget 2GB --keep-alive 10m
    """
    api_key = api_key or read_key_file(api_key_file)  # an empty OPT_API_KEY is no key
    check_bind(host, api_key, insecure_no_auth)
    # Front ends never import each other statically (import-linter); the server is started here.
    serving = importlib.import_module("openpto.serving")
    settings = serving.ServerSettings(
        host=host, port=port, api_key=api_key, cors_origins=tuple(cors_origin),
        log_prompts=log_prompts, max_tokens_limit=max_tokens_limit,
        **serving.pool_settings(keep_alive, max_loaded, memory_budget))
    options = serving.EngineOptions(dtype=dtype, device=device, max_batch=max_batch, draft=draft,
                                    threads=threads)

    def started(info: dict[str, object]) -> None:
        if as_json:
            emit(info, True)
        else:
            stderr.print(f"serving {info['model']} ({backend}) on {info['url']} (Ctrl-C stops)")

    serving.serve_model(model, backend, settings, options, on_started=started)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine. Names other than localhost count as not:
    what they resolve to can change."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_key_file(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the API key file {path}: {exc.strerror}") from exc
    if not key:
        raise UsageError(f"the API key file {path} is empty")
    return key


def check_bind(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """A server reachable from other machines needs a key, unless the user says otherwise."""
    if api_key is not None or is_loopback(host):
        return
    if not insecure_no_auth:
        raise UsageError(
            f"refusing to listen on {host} without an API key: pass --api-key (or set "
            "OPT_API_KEY), or --insecure-no-auth to serve without one")
    stderr.print(f"warning: serving on {host} with no API key (--insecure-no-auth): anyone who "
                 "can reach this address can use the server")
