"""``opt llm``: prompt a model through ``llm``, list and install its plugins, draft shell commands.

Everything goes through ``llm``'s own Python API, so prompts are logged in ``llm``'s ``logs.db``
as ``llm prompt`` logs them, and any model an ``llm`` plugin provides can be named.

``draft_command`` is llm-cmd's idea: the model drafts one shell command for a description. It
runs only after an explicit yes, and without a shell: the command is split with ``shlex`` and
executed directly, so pipes, redirections, globs and variables are not interpreted — a draft
that needs them is printed and refused, for the user to paste into a shell themselves.
"""

from __future__ import annotations

import shlex
import subprocess  # nosec B404  # argument lists only, never a shell
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from openpto.errors import OptError, UsageError, require

DEFAULT_MODEL = "opt/smollm2-135m"

CMD_SYSTEM = (
    "Return only the shell command to be executed as a raw string: no quotes around it, no "
    "explanation, no markdown, no code fences. It is run as it is on {platform}."
)

# Characters a shell would interpret; without a shell they would reach the program literally.
_SHELL_SYNTAX = set("|&;<>()$`*?[]{}~!\\\n")


def _llm() -> Any:
    return require("llm", "llm", "opt llm")


def get_model(model_id: str | None) -> Any:
    llm = _llm()
    try:
        return llm.get_model(model_id or DEFAULT_MODEL)
    except llm.UnknownModelError as exc:
        raise UsageError(f"{exc.args[0]} (see: llm models)") from exc


def parse_options(model: Any, pairs: list[str]) -> dict[str, Any]:
    """``-o key=value`` options validated by the model's own Options class."""
    from pydantic import ValidationError

    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"an option is KEY=VALUE, got {pair!r}")
        raw[key.strip()] = value
    try:
        validated = model.Options(**raw)
    except ValidationError as exc:
        reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UsageError(f"bad option for {model.model_id}: {reason}") from exc
    return {k: v for k, v in dict(validated).items() if k in raw}


@dataclass
class PromptReply:
    model: str
    prompt: str
    chunks: Iterator[str]
    response: Any = field(repr=False)

    def finish(self) -> dict[str, Any]:
        """Log the response to llm's ``logs.db``; the ``--json`` object."""
        text = self.response.text()
        log_response(self.response)
        usage = self.response.usage()
        return {"model": self.model, "prompt": self.prompt, "response": text,
                "input_tokens": usage.input, "output_tokens": usage.output,
                "duration_ms": self.response.duration_ms()}


def prompt(text: str, model_id: str | None = None, system: str | None = None,
           options: list[str] | None = None, stream: bool = True) -> PromptReply:
    """Start a prompt; iterate ``chunks`` for the text as it comes, then ``finish()``."""
    if not text.strip():
        raise UsageError("the prompt is empty")
    model = get_model(model_id)
    kwargs = parse_options(model, options or [])
    response = model.prompt(text, system=system, stream=stream, **kwargs)
    try:
        iterator = iter(response)
    except Exception as exc:
        raise _model_error(model.model_id, exc) from exc
    return PromptReply(model.model_id, text, _guarded(model.model_id, iterator), response)


def _guarded(model_id: str, chunks: Iterator[str]) -> Iterator[str]:
    try:
        yield from chunks
    except OptError:
        raise
    except Exception as exc:  # a plugin's own error type: one line naming the model
        raise _model_error(model_id, exc) from exc


def _model_error(model_id: str, exc: Exception) -> OptError:
    return OptError(f"{model_id}: {type(exc).__name__}: {exc}")


def log_response(response: Any) -> None:
    """Log as ``llm prompt`` does, into ``llm``'s own ``logs.db``, migrated first."""
    import sqlite_utils

    llm = _llm()
    from llm.migrations import migrate

    db = sqlite_utils.Database(llm.user_dir() / "logs.db")
    migrate(db)
    response.log_to_db(db)


def plugins() -> list[dict[str, Any]]:
    """``llm``'s loaded plugins: name, hooks, version (what ``llm plugins`` prints)."""
    llm = _llm()
    from llm.plugins import load_plugins

    load_plugins()  # what llm's CLI does at start; the API loads them on first use only
    plugins_list: list[dict[str, Any]] = llm.get_plugins()
    return plugins_list


def install_plugin(name: str) -> dict[str, Any]:
    """``pip install NAME`` into this environment (where ``llm`` and ``opt`` run)."""
    if not name.strip() or name.startswith("-"):
        raise UsageError(f"not a package name: {name!r}")
    done = subprocess.run([sys.executable, "-m", "pip", "install", name],  # nosec B603  # pip with a checked package name, no shell
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise OptError(f"pip could not install {name}: {last}")
    return {"installed": name, "python": sys.executable}


# -- opt llm cmd -------------------------------------------------------------------------------


def clean_command(text: str) -> str:
    """The command out of a reply that may still wrap it in a fence or quotes."""
    lines = [line for line in text.strip().splitlines() if not line.strip().startswith("```")]
    command = "\n".join(lines).strip()
    if len(command) >= 2 and command[0] == command[-1] and command[0] in "`'\"":
        command = command[1:-1].strip()
    return command.removeprefix("$ ").strip()


def needs_shell(command: str) -> bool:
    """True when the command means something only a shell would make of it: shell syntax
    outside quotes, ``$`` or a backquote inside double quotes, or unbalanced quotes."""
    quote = ""
    for char in command:
        if quote == "'":
            quote = "" if char == "'" else quote
        elif quote == '"':
            if char in "$`\\":
                return True
            quote = "" if char == '"' else quote
        elif char in "'\"":
            quote = char
        elif char in _SHELL_SYNTAX:
            return True
    return bool(quote)


@dataclass(frozen=True)
class DraftedCommand:
    description: str
    command: str
    ran: bool = False
    returncode: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "command": self.command, "ran": self.ran,
                "returncode": self.returncode, "reason": self.reason}


def draft(description: str, model_id: str | None = None,
          options: list[str] | None = None) -> str:
    import platform

    if not description.strip():
        raise UsageError("describe the command to draft")
    reply = prompt(description, model_id, CMD_SYSTEM.format(platform=platform.system()),
                   options, stream=False)
    text = "".join(reply.chunks)
    reply.finish()
    command = clean_command(text)
    if not command:
        raise OptError(f"{reply.model} drafted no command")
    return command


def run_drafted(description: str, command: str, *, interactive: bool,
                confirm: Callable[[str], bool]) -> DraftedCommand:
    """Run ``command`` only when ``interactive`` and ``confirm`` says yes; never through a
    shell (see the module docstring)."""
    if not interactive:
        return DraftedCommand(description, command, reason="not interactive: not run")
    if needs_shell(command):
        return DraftedCommand(description, command,
                              reason="uses shell syntax; not run (paste it into a shell)")
    if not confirm(command):
        return DraftedCommand(description, command, reason="declined")
    argv = shlex.split(command)
    try:
        done = subprocess.run(argv, check=False)  # nosec B603  # the command the user confirmed, split without a shell
    except OSError as exc:
        raise OptError(f"cannot run {argv[0]!r}: {exc}") from exc
    return DraftedCommand(description, command, ran=True, returncode=done.returncode)
