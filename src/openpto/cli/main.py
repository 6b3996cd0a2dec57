"""The ``opt`` application: assembles the noun modules and turns errors into one clear line."""

from __future__ import annotations

import importlib
import signal
import sys

import typer

from openpto import __version__
from openpto.errors import OptError

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a running run is recorded as failed."""


_terminated: list[int] = []


def _raise_terminated(signum: int, frame: object) -> None:
    _terminated.append(signum)
    raise Terminated(f"terminated by signal {signum}")


def _interrupted_exit() -> None:
    if _terminated:
        sys.stderr.write("error: terminated\n")
        sys.exit(143)
    sys.stderr.write("error: interrupted\n")
    sys.exit(130)


def run() -> None:
    """Entry point: every ``OptError`` becomes one line on stderr and a non-zero exit."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = app(standalone_mode=False)
    except OptError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
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
        show()
        sys.exit(getattr(exc, "exit_code", 2))
    # Typer returns 130 instead of raising when a command was interrupted.
    if code == 130:
        _interrupted_exit()
    if isinstance(code, int) and code != 0:
        sys.exit(code)
