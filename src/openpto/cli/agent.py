"""``opt agent``: an AI agent (OpenAI Agents SDK) whose tools are the toolkit's workflows.

``opt agent PROMPT`` runs one prompt to completion; ``opt agent`` alone reads prompts from stdin
until end of input (or ``exit``). ``opt agent history [NAME]`` lists the conversations or shows
one. The agent itself lives in ``openpto.agents``, which this module starts by name (front ends
never import each other statically).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from openpto.cli.common import JSON_HELP, emit
from openpto.errors import OptError


class _PromptFirst(TyperGroup):
    """``opt agent [OPTIONS] [PROMPT]`` means ``opt agent ask ...``: anything that is not a
    subcommand's name goes to ``ask``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["ask", *args]
        return super().parse_args(ctx, args)


agent_app = typer.Typer(
    cls=_PromptFirst,
    help="Ask an AI agent that runs the toolkit for you (OpenAI Agents SDK).\n\n"
    "opt agent PROMPT runs one prompt; opt agent alone reads prompts from stdin.\n\n"
    'Example: opt agent "which artifacts do I have, and how big are they?"',
)


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")


def _runner() -> Any:
    return importlib.import_module("openpto.agents.runner")


class EventView:
    """The agent's events for people: text as it streams, a line per tool call and result.

    Everything goes to one console, so text and tool lines keep their order; with ``--json`` it
    is stderr (stdout holds only the JSON object)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.mid_line = False

    def __call__(self, event: Any) -> None:
        runner = _runner()
        if isinstance(event, runner.TextDelta):
            self.console.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
            self.console.file.flush()
            self.mid_line = not event.text.endswith("\n")
            return
        self.end_line()
        if isinstance(event, runner.ToolCalled):
            arguments = json.dumps(event.arguments, default=str)
            self.console.print(f"[bold cyan]→ {escape(event.name)}[/] {escape(arguments)}",
                               highlight=False, soft_wrap=True)
        elif isinstance(event, runner.ToolFinished):
            mark = "[green]✓[/]" if event.ok else "[red]✗[/]"
            shown = event.output if len(event.output) <= 300 else event.output[:300] + " …"
            self.console.print(f"{mark} {escape(event.name)}: {escape(shown)}", highlight=False,
                               soft_wrap=True)
        self.console.file.flush()

    def end_line(self) -> None:
        if self.mid_line:
            self.console.print()
            self.mid_line = False


def _ask_user(console: Console) -> Any:
    async def confirm(name: str, arguments: dict[str, Any]) -> bool:
        def ask() -> bool:
            console.print(f"[bold yellow]The agent wants to run {escape(name)}[/] "
                          f"{escape(json.dumps(arguments, default=str))}", highlight=False,
                          soft_wrap=True)
            sys.stderr.write("Run it? [y/N] ")
            sys.stderr.flush()
            answer = sys.stdin.readline()
            return answer.strip().lower() in ("y", "yes")

        # stdin is read in a worker thread, so the stream keeps flowing meanwhile.
        return await asyncio.to_thread(ask)

    return confirm


@agent_app.command("ask")
def ask_cmd(
    prompt: str | None = typer.Argument(None, help="What to ask; none: read prompts from stdin."),
    base_url: str | None = typer.Option(
        None, help="An OpenAI-compatible endpoint (default: OPENAI_BASE_URL; else OpenAI when "
        "OPENAI_API_KEY is set; else opt serve of the default model, started here)."),
    model: str | None = typer.Option(None, help="The model name at the endpoint (default: its "
                                     "first listed model; the served model for our own)."),
    session: str | None = typer.Option(None, help="Resume or start the conversation NAME "
                                       "(stored in opt.db; default: a new one)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Run tools that write or take long "
                             "(quantize, sparsify, export, bench) without asking."),
    max_turns: int = typer.Option(10, min=1, help="Most model turns for one prompt."),
    trace: bool = typer.Option(False, "--trace", help="Send the SDK's trace to OpenAI (only "
                               "when the endpoint is api.openai.com)."),
    tool_choice: str | None = typer.Option(
        None, help="auto (default), required, none, or a tool's name to force that call first."),
    tools: str | None = typer.Option(
        None, help="Offer only these tools, comma-separated (default: all)."),
    max_tokens: int | None = typer.Option(None, min=1, help="Most tokens of one model reply."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Ask the agent: it calls the toolkit's tools (info, models, evaluate, quantize, sparsify,
    export, profile, bench, read-only database queries, runs) and answers.

    The API key is taken from OPENAI_API_KEY only. Text streams as it comes, with a line per
    tool call and result; with --json those go to stderr and stdout gets one object (output,
    tool_calls, session, run_id).

    Example: opt agent --session work "evaluate smollm2-135m on stdlib-docstrings"
    """
    runner = _runner()
    settings = runner.AgentSettings(base_url=base_url, model=model, session=session, yes=yes,
                                    max_turns=max_turns, trace=trace, tool_choice=tool_choice,
                                    max_tokens=max_tokens, tools=_names(tools))
    console = Console(stderr=True) if as_json else Console()
    view = EventView(console)
    confirm = _ask_user(Console(stderr=True))
    if prompt is not None:
        result = asyncio.run(runner.run_agent(prompt, settings, confirm=confirm, on_event=view))
        view.end_line()
        if as_json:
            emit(result.to_dict(), True)
        else:
            Console(stderr=True).print(f"[dim]session {result.session} · run {result.run_id}[/]")
        return
    results = asyncio.run(_interactive(runner, settings, view, confirm))
    if as_json:
        last = results[-1] if results else None
        emit({"output": last.output if last else "",
              "tool_calls": [c for r in results for c in r.tool_calls],
              "session": settings.session or (last.session if last else None),
              "run_id": last.run_id if last else None,
              "exchanges": [r.to_dict() for r in results]}, True)


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(n.strip() for n in text.split(",") if n.strip())


async def _interactive(runner: Any, settings: Any, view: EventView, confirm: Any) -> list[Any]:
    """Prompts from stdin, one per line, in one conversation and against one endpoint (the
    built-in server starts once), until end of input or ``exit``."""
    import dataclasses

    err = Console(stderr=True)
    if settings.session is None:
        settings = dataclasses.replace(settings, session=runner.new_session_name())
    err.print(f"[dim]session {settings.session}: one prompt per line; exit or end of input "
              "stops[/]")
    results = []
    async with runner.opened_endpoint(settings) as endpoint:
        while True:
            sys.stderr.write("you> ")
            sys.stderr.flush()
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line or line.strip() in ("exit", "quit"):
                break
            if not line.strip():
                continue
            try:
                results.append(await runner.run_agent(line.strip(), settings, confirm=confirm,
                                                      on_event=view, endpoint=endpoint))
            except OptError as exc:  # one failed exchange does not end the conversation
                view.end_line()
                err.print(f"[red]error:[/] {escape(str(exc))}")
                continue
            view.end_line()
    return results


@agent_app.command("history")
def history_cmd(
    name: str | None = typer.Argument(None, help="A session's name; none: list them all."),
    db: Path | None = typer.Option(None, help="The database (default: OPT_DB or opt.db)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List the agent's conversations, or show one's messages (prompts, tool calls, answers).

    Example: opt agent history work --json
    """
    history = importlib.import_module("openpto.agents.history")
    if name is None:
        sessions = history.list_sessions(db)
        if as_json:
            emit({"sessions": sessions}, True)
            return
        table = Table("session", "updated", "messages", "exchanges", "last prompt",
                      title="agent sessions")
        for s in sessions:
            table.add_row(s["session"], str(s["updated_at"]), str(s["messages"]),
                          str(s["exchanges"]), escape((s["last_prompt"] or "")[:60]))
        Console().print(table)
        return
    messages = history.session_messages(name, db)
    if as_json:
        emit({"session": name, "messages": messages}, True)
        return
    console = Console()
    for m in messages:
        style = {"user": "bold", "tool": "dim"}.get(m["role"], "cyan")
        console.print(f"[{style}]{m['role']}[/] {escape(m['text'])}", highlight=False,
                      soft_wrap=True)
