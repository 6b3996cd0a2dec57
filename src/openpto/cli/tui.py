"""``opt tui``: the terminal UI (the same app as the ``opt-tui`` script)."""

from __future__ import annotations

import importlib

import typer

from openpto.errors import MissingDependency, UsageError

THEME_HELP = "dark or light (default: [tui] theme in OPT_HOME/config.toml, else dark)."
DB_HELP = "The run database (default: OPT_DB, else OPT_HOME/opt.db)."


def register(app: typer.Typer) -> None:
    app.command("tui")(tui_cmd)


def tui_cmd(
    theme: str | None = typer.Option(None, "--theme", help=THEME_HELP),
    db: str | None = typer.Option(None, "--db", help=DB_HELP, metavar="PATH"),
) -> None:
    """Open the terminal UI: quantize, sparsify, evaluate, serve and browse runs with live
    progress and charts.

    Example: opt tui --theme light --db ~/.openpto/opt.db
    """
    if theme is not None and theme not in ("dark", "light"):
        raise UsageError(f"--theme {theme!r}: choose dark or light")
    try:
        importlib.import_module("textual")
    except ImportError as exc:
        raise MissingDependency("textual", "tui", "opt tui") from exc
    # Front ends never import each other statically (import-linter); the TUI is started here.
    tui_app = importlib.import_module("openpto.tui.app")
    tui_app.make_app(theme=theme, db_path=db).run()
