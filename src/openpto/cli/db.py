"""``opt db``: where the run database is, what it holds, read-only queries, export, Datasette."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from openpto.cli.common import JSON_HELP, emit, stderr

db_app = typer.Typer(help="Browse the run database.\n\nExample: opt db query 'select * from runs'",
                     no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")


def _store():  # type: ignore[no-untyped-def]
    from openpto.store import Store

    return Store()


@db_app.command("path")
def path_cmd() -> None:
    """Print the database path.

    Example: opt db path
    """
    from openpto.store import default_db_path

    typer.echo(str(default_db_path()))


@db_app.command("tables")
def tables_cmd(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the tables and their row counts.

    Example: opt db tables --json
    """
    emit(_store().tables(), as_json, title="tables")


@db_app.command("query")
def query_cmd(
    sql: str = typer.Argument(..., help="One SQL statement; the database is opened read-only."),
) -> None:
    """Run a read-only SQL query and print the rows as a JSON array.

    Example: opt db query "select kind, status, model from runs order by started_at desc limit 5"
    """
    import json

    rows = _store().query_readonly(sql)
    sys.stdout.write(json.dumps(rows, default=str) + "\n")


@db_app.command("export")
def export_cmd(
    table: str = typer.Argument(..., help="Table name, e.g. runs or metrics."),
    fmt: str = typer.Option("json", "--format", help="json or csv."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write to this file instead of stdout."
    ),
) -> None:
    """Export a table as JSON or CSV.

    Example: opt db export metrics --format csv -o metrics.csv
    """
    text = _store().export(table, fmt)
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        output.write_text(text)
        stderr.print(f"wrote {output}")


@db_app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(9000, help="Port to listen on."),
) -> None:
    """Browse the database in Datasette (titles, descriptions, canned queries).

    Example: opt db serve --port 9000
    """
    from openpto.store.browse import serve_datasette

    store = _store()
    stderr.print(f"Datasette on http://{host}:{port}/ for {store.path}")
    raise typer.Exit(serve_datasette(store.path, host, port))
