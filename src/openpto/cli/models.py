"""``opt models``: the artifacts this toolkit has written."""

from __future__ import annotations

import json
import sys

import typer

from openpto.cli.common import JSON_HELP

models_app = typer.Typer(help="Artifacts written by opt.\n\nExample: opt models list --json",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


@models_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List saved artifacts: id, path, method, size and when they were made.

    Example: opt models list --json
    """
    from rich.console import Console
    from rich.table import Table

    from openpto.store import Store

    keys = ("id", "path", "method", "size_bytes", "created_at")
    rows = [{k: row.get(k) for k in keys} for row in Store().rows("models")]
    if as_json:
        sys.stdout.write(json.dumps(rows, default=str) + "\n")
        return
    table = Table(*keys, title="models")
    for row in rows:
        table.add_row(*(str(row[k]) for k in keys))
    Console().print(table)
