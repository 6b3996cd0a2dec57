"""``opt plugins``: the plugins that filled the registries, and what each registered."""

from __future__ import annotations

import typer

from openpto.cli.common import JSON_HELP, emit


def register(app: typer.Typer) -> None:
    app.command("plugins")(plugins_cmd)


def plugins_cmd(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the plugins (built-in and installed through the openpto.plugins entry points), the
    methods, backends, kernels and formats each registered, and any that failed to load.

    Example: opt plugins --json
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from openpto.plugins import plugin_report

    report = plugin_report()
    if as_json:
        emit(report, as_json=True)
        return
    table = Table("plugin", "from", "registers", "names", title="plugins")
    for plugin in report["plugins"]:
        origin = "built-in" if plugin["builtin"] else plugin["distribution"] or ""
        for row, (kind, names) in enumerate(plugin["registered"].items()):
            first = row == 0
            table.add_row(plugin["name"] if first else "", escape(origin) if first else "",
                          kind, escape(", ".join(names)))
    console = Console()
    console.print(table)
    for failed in report["failed"]:
        console.print(f"failed: {escape(failed['name'])}: {escape(failed['error'])}", style="red")
