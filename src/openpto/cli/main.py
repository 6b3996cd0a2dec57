"""The ``opt`` application: assembles the noun modules and turns errors into one clear line."""

from __future__ import annotations

import importlib
import signal
import sys
from typing import NoReturn

import typer

from openpto import __version__
from openpto.cli.common import JsonlProgress, claim_stderr_for_jsonl, jsonl_requested
from openpto.errors import OptError
from openpto.progress import error_reason
from openpto.store.process import raise_on_stop_signals, sigterm_received

# One module per noun; each exposes ``register(app)``. Kept as names so that adding a command
# never means touching the others.
COMMAND_MODULES = [
    "openpto.cli.db",
    "openpto.cli.models",
    "openpto.cli.info",
    "openpto.cli.plugins",
    "openpto.cli.eval",
    "openpto.cli.quantize",
    "openpto.cli.export",
    "openpto.cli.sparsify",
    "openpto.cli.serve",
    "openpto.cli.generate",
    "openpto.cli.speculative",
    "openpto.cli.profile",
    "openpto.cli.tui",
    "openpto.cli.agent",
    "openpto.cli.ollama",
    "openpto.cli.llm",
]

app = typer.Typer(
    name="opt",
    help="Make open language models smaller and faster after training, and prove it.\n\n"
    "Example: opt eval smollm2-135m --max-tokens 4096",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"openpto {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Make open language models smaller and faster after training, and prove it."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def _stop_listening() -> None:
    """The command is exiting: later stop signals of the same burst change nothing."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def _fail(message: str, code: int) -> NoReturn:
    """Report an error as one line (a ``run_failed`` event with ``--progress jsonl``), exit."""
    _stop_listening()
    if _jsonl is not None:
        _jsonl.fail(message)
    else:
        sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def _interrupted_exit() -> NoReturn:
    _stop_listening()
    if sigterm_received():
        _fail("terminated", 143)
    _fail("interrupted", 130)


_jsonl: JsonlProgress | None = None


def run() -> None:
    """Entry point: every ``OptError`` becomes one line on stderr and a non-zero exit."""
    global _jsonl
    raise_on_stop_signals()
    if jsonl_requested(sys.argv[1:]):
        _jsonl = claim_stderr_for_jsonl()
    try:
        _run()
    except KeyboardInterrupt:
        # A stop signal of the same burst landed while an error was being reported.
        _interrupted_exit()


def _user_defaults() -> dict[str, object]:
    """``OPT_HOME/config.toml``'s ``[defaults]`` as click's ``default_map`` for every command."""
    from openpto.user_config import command_default_map

    names = [c.name for c in app.registered_commands if c.name]
    return command_default_map(names)


def _run() -> None:
    try:
        code = app(standalone_mode=False, default_map=_user_defaults())
    except OptError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _interrupted_exit()
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        _interrupted_exit()
    except typer.TyperException as exc:
        # Usage errors (bad option values, unknown commands) arrive here in non-standalone
        # mode; they know how to print themselves with the usage line.
        show = getattr(exc, "show", None)
        if show is None:
            raise
        if _jsonl is not None:
            _fail(exc.format_message(), getattr(exc, "exit_code", 2))
        show()
        sys.exit(getattr(exc, "exit_code", 2))
    except Exception as exc:
        if _jsonl is None:
            raise
        # Nothing but events may reach stderr: an unexpected error is one too.
        _fail(error_reason(exc), 1)
    # Typer returns 130 instead of raising when a command was interrupted.
    if code == 130:
        _interrupted_exit()
    if isinstance(code, int) and code != 0:
        sys.exit(code)
