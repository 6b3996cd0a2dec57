"""``opt llm``: prompts, plugins, log import and command drafting through Simon Willison's llm."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer

from openpto.cli.common import JSON_HELP, emit, stderr

llm_app = typer.Typer(help="Use llm with our models, and keep what it logs.\n\n"
                      "Example: opt llm prompt 'Name three colours' -m opt/smollm2-135m",
                      no_args_is_help=True)
logs_app = typer.Typer(help="llm's logs.db.\n\nExample: opt llm logs import --json",
                       no_args_is_help=True)
llm_app.add_typer(logs_app, name="logs")

MODEL_HELP = "An llm model id (see: llm models); default opt/smollm2-135m."
OPTION_HELP = "A model option KEY=VALUE, e.g. -o temperature=0.7 (repeatable)."


def register(app: typer.Typer) -> None:
    app.add_typer(llm_app, name="llm")


def _commands() -> Any:
    # Front ends never import each other statically (import-linter).
    return importlib.import_module("openpto.integrations.llm_commands")


@llm_app.command("prompt")
def prompt_cmd(
    text: str = typer.Argument(..., help="The prompt."),
    model: str | None = typer.Option(None, "-m", "--model", help=MODEL_HELP),
    system: str | None = typer.Option(None, "-s", "--system", help="A system prompt."),
    option: list[str] = typer.Option([], "-o", "--option", help=OPTION_HELP),
    stream: bool = typer.Option(True, help="Print the text as it comes."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Prompt a model through llm (logged in llm's logs.db, as llm prompt logs it).

    Example: opt llm prompt "Write a haiku about tea" -o max_tokens=60
    """
    reply = _commands().prompt(text, model, system, option, stream=stream and not as_json)
    for chunk in reply.chunks:
        if not as_json:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    result = reply.finish()
    if as_json:
        emit(result, True)
    else:
        sys.stdout.write("\n")


@llm_app.command("plugins")
def plugins_cmd(
    action: str | None = typer.Argument(None, help="'install' to install a plugin."),
    name: str | None = typer.Argument(None, help="The plugin's package, e.g. llm-ollama."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List llm's plugins, or install one into this environment (pip).

    Example: opt llm plugins install llm-ollama
    """
    from openpto.errors import UsageError

    commands = _commands()
    if action is None:
        found = commands.plugins()
        if as_json:
            emit({"plugins": found}, True)
        for plugin in [] if as_json else found:
            typer.echo(f"{plugin['name']} {plugin.get('version', '')}  "
                       f"hooks: {', '.join(plugin.get('hooks', []))}")
        return
    if action != "install" or not name:
        raise UsageError("usage: opt llm plugins [install NAME]")
    result = commands.install_plugin(name)
    if as_json:
        emit(result, True)
    else:
        stderr.print(f"installed {name}")


@logs_app.command("import")
def logs_import_cmd(
    path: str | None = typer.Argument(None, help="logs.db (default: llm's own)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Copy llm's logged prompts into the prompts table (source 'llm'); a second run adds
    nothing. Reads both llm's legacy responses table and its threads/turns schema.

    Example: opt llm logs import ~/.config/io.datasette.llm/logs.db --json
    """
    logs = importlib.import_module("openpto.integrations.llm_logs")
    emit(logs.import_llm_logs(path).to_dict(), as_json, "llm logs import")


@llm_app.command("cmd")
def cmd_cmd(
    description: str = typer.Argument(..., help="What the command should do."),
    model: str | None = typer.Option(None, "-m", "--model", help=MODEL_HELP),
    option: list[str] = typer.Option([], "-o", "--option", help=OPTION_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " (never runs it)"),
) -> None:
    """Draft a shell command with a model and print it; run it only after you answer yes.
    It never runs with --json or without a terminal, and never through a shell: a command
    with pipes, redirections or variables is printed for you to paste.

    Example: opt llm cmd "list the five largest files in this folder"
    """
    commands = _commands()
    command = commands.draft(description, model, option)
    interactive = not as_json and sys.stdin.isatty() and sys.stdout.isatty()
    if not as_json:
        typer.echo(command)

    def confirm(text: str) -> bool:
        return bool(typer.confirm("Run it?", default=False))

    result = commands.run_drafted(description, command, interactive=interactive,
                                  confirm=confirm)
    if as_json:
        emit(result.to_dict(), True)
    elif not result.ran:
        stderr.print(result.reason)
    elif result.returncode:
        raise typer.Exit(result.returncode)
