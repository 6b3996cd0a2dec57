"""``opt ollama``: the official Ollama client against a host, and ``push`` of our artifacts."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer

from openpto.cli.common import JSON_HELP, emit, stderr

ollama_app = typer.Typer(help="Talk to an Ollama server (or opt serve) with the official "
                         "client.\n\n"
                         "Example: opt ollama push ./artifacts/smollm2-w4g32 --name smollm2-w4",
                         no_args_is_help=True)

HOST_HELP = ("Ollama's address: host, host:port or a URL (default OLLAMA_HOST, else "
             "127.0.0.1:11434).")
HostOpt = typer.Option(None, "--host", help=HOST_HELP)
JsonOpt = typer.Option(False, "--json", help=JSON_HELP)


def register(app: typer.Typer) -> None:
    app.add_typer(ollama_app, name="ollama")


def _client() -> Any:
    # Front ends never import each other statically (import-linter).
    return importlib.import_module("openpto.integrations.ollama_client")


def _print_models(result: dict[str, Any], key: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "size", "modified / expires", title=result.get("host"))
    for model in result.get(key, []):
        table.add_row(str(model.get("model") or model.get("name")), str(model.get("size", "")),
                      str(model.get("modified_at") or model.get("expires_at") or ""))
    Console().print(table)


@ollama_app.command("list")
def list_cmd(host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """The models the server has (/api/tags).

    Example: opt ollama list --host 127.0.0.1:11434 --json
    """
    result = _client().call(host, "list")
    emit(result, True) if as_json else _print_models(result, "models")


@ollama_app.command("ps")
def ps_cmd(host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """The models loaded now, with sizes and when they unload (/api/ps).

    Example: opt ollama ps --json
    """
    result = _client().call(host, "ps")
    emit(result, True) if as_json else _print_models(result, "models")


@ollama_app.command("show")
def show_cmd(model: str = typer.Argument(..., help="NAME[:TAG]."),
             host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """A model's details, template, parameters and license (/api/show).

    Example: opt ollama show smollm2-w4 --json
    """
    result = _client().call(host, "show", model)
    result.pop("modelinfo", None) if not as_json else None
    emit(result, as_json, model)


@ollama_app.command("pull")
def pull_cmd(model: str = typer.Argument(..., help="NAME[:TAG] to pull."),
             host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Pull a model onto the server, with a progress bar per layer.

    Example: opt ollama pull smollm2:135m
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    console=stderr, disable=as_json)
    tasks: dict[str, Any] = {}

    def show(chunk: dict[str, Any]) -> None:
        digest = chunk.get("digest")
        if digest and chunk.get("total"):
            if not tasks:
                bars.start()  # only once there is a layer: nothing to draw before
            if digest not in tasks:
                tasks[digest] = bars.add_task(f"pulling {digest[7:19]}", total=chunk["total"])
            bars.update(tasks[digest], completed=chunk.get("completed") or 0)
        elif not as_json:
            bars.console.print(str(chunk.get("status", "")), highlight=False)

    try:
        result = _client().pull(host, model, show)
    finally:
        if tasks:
            bars.stop()
    emit(result, as_json, "pull")


@ollama_app.command("delete")
def delete_cmd(model: str = typer.Argument(..., help="NAME[:TAG] to delete."),
               host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Delete a model from the server.

    Example: opt ollama delete smollm2-w4
    """
    emit({**_client().call(host, "delete", model), "model": model}, as_json, "delete")


@ollama_app.command("copy")
def copy_cmd(source: str = typer.Argument(..., help="The model to copy."),
             destination: str = typer.Argument(..., help="The new NAME[:TAG]."),
             host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Copy a model under a new name.

    Example: opt ollama copy smollm2-w4 smollm2-w4:backup
    """
    result = _client().call(host, "copy", source, destination)
    emit({**result, "source": source, "destination": destination}, as_json, "copy")


def _sampling(temperature: float | None, top_p: float | None, seed: int | None,
              max_tokens: int | None) -> Any:
    return _client().sampling_options(temperature, top_p, seed, max_tokens)


def _printer(as_json: bool) -> Any:
    def out(text: str) -> None:
        if not as_json:
            sys.stdout.write(text)
            sys.stdout.flush()
    return out


@ollama_app.command("chat")
def chat_cmd(model: str = typer.Argument(..., help="NAME[:TAG]."),
             prompt: str = typer.Argument(..., help="The user message."),
             system: str | None = typer.Option(None, "--system", help="A system message."),
             temperature: float | None = typer.Option(None, min=0.0, help="0 is greedy."),
             top_p: float | None = typer.Option(None, min=0.0, max=1.0, help="Nucleus mass."),
             seed: int | None = typer.Option(None, help="Sampling seed."),
             max_tokens: int | None = typer.Option(None, min=1, help="Most new tokens."),
             host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Chat with a model (/api/chat), printing the reply as it streams.

    Example: opt ollama chat smollm2-w4 "Name three rivers." --max-tokens 40
    """
    result = _client().chat(host, model, prompt, system,
                            _sampling(temperature, top_p, seed, max_tokens), _printer(as_json))
    emit(result, True) if as_json else sys.stdout.write("\n")


@ollama_app.command("generate")
def generate_cmd(model: str = typer.Argument(..., help="NAME[:TAG]."),
                 prompt: str = typer.Argument(..., help="The prompt."),
                 system: str | None = typer.Option(None, "--system", help="A system prompt."),
                 temperature: float | None = typer.Option(None, min=0.0, help="0 is greedy."),
                 top_p: float | None = typer.Option(None, min=0.0, max=1.0, help="Nucleus mass."),
                 seed: int | None = typer.Option(None, help="Sampling seed."),
                 max_tokens: int | None = typer.Option(None, min=1, help="Most new tokens."),
                 host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Complete a prompt (/api/generate), printing the text as it streams.

    Example: opt ollama generate smollm2-w4 "Once upon a time" --max-tokens 40
    """
    result = _client().generate(host, model, prompt, system,
                                _sampling(temperature, top_p, seed, max_tokens),
                                _printer(as_json))
    emit(result, True) if as_json else sys.stdout.write("\n")


@ollama_app.command("embed")
def embed_cmd(model: str = typer.Argument(..., help="NAME[:TAG]."),
              text: list[str] = typer.Argument(..., help="One or more texts."),
              host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Embed texts (/api/embed): one vector per text.

    Example: opt ollama embed smollm2-w4 "hello" "world" --json
    """
    result = _client().call(host, "embed", model, input=text)
    if as_json:
        emit(result, True)
        return
    for given, vector in zip(text, result.get("embeddings", []), strict=False):
        shown = ", ".join(f"{v:.4f}" for v in vector[:4])
        typer.echo(f"{given!r}: {len(vector)} dims [{shown}, …]")


@ollama_app.command("push")
def push_cmd(artifact: str = typer.Argument(..., help="An artifact folder written by opt."),
             name: str = typer.Option(..., "--name", help="NAME[:TAG] to create."),
             gguf_type: str | None = typer.Option(
                 None, "--type", help="q8_0, q4_0, q4_1 or f16 (default: the type the "
                 "artifact's grid maps onto exactly)."),
             modelfile: str | None = typer.Option(
                 None, "--modelfile", help="Also write the equivalent Modelfile here (the GGUF "
                 "is kept beside it)."),
             host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Export an artifact to GGUF, upload it and create an Ollama model with its chat template
    (converted to Ollama's Go template and checked), stop strings, system prompt and license.

    Example: opt ollama push ~/.openpto/artifacts/smollm2-gptq-w4g32 --name smollm2-gptq:w4
    """
    push = importlib.import_module("openpto.integrations.ollama_push")

    def status(text: str) -> None:
        if text and not as_json:
            stderr.print(text, highlight=False)

    result = push.push(artifact, name, host=host, gguf_type=gguf_type, modelfile_path=modelfile,
                       on_status=status)
    for warning in [] if as_json else result.warnings:
        stderr.print(f"[yellow]warning:[/yellow] {warning}")
    emit(result.to_dict(), as_json, f"pushed {result.name}")
