"""``opt info``: Python, torch, CPU features, devices, and which backends can run here.

Two backend lists: ``backends`` (packages and device features, probed by ``openpto.hardware``)
and ``quantization_backends`` (each ``opt quantize --backend`` choice, asked through
``openpto.pipeline.backends``, which knows what each one needs beyond its package being there).
"""

from __future__ import annotations

from typing import Any

import typer

from openpto.cli.common import JSON_HELP, emit


def register(app: typer.Typer) -> None:
    app.command("info")(info_cmd)


def info_cmd(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Show this machine: Python, torch, CPU features, devices, and each backend's availability.

    Example: opt info --json
    """
    from openpto.hardware import hardware_info
    from openpto.pipeline.backends import backend_availability
    from openpto.store import RunRecorder, Store

    with RunRecorder(Store(), "info", None) as run, run.trace("hardware") as attributes:
        info = hardware_info()
        info["quantization_backends"] = backend_availability()
        attributes.update(info)  # which machine later runs were measured on
    info["run_id"] = run.id
    if as_json:
        emit(info, as_json=True)
    else:
        _print_tables(info)


def _print_tables(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    cpu = info["cpu"]
    machine = Table(title="machine", show_header=False)
    machine.add_column("key", style="bold")
    machine.add_column("value")
    machine.add_row("python", info["python"])
    machine.add_row("torch", info["torch"])
    machine.add_row("platform", f"{info['platform']['system']} {info['platform']['machine']}")
    machine.add_row("cpu", cpu["model"])
    cores = ", ".join(f"{n} {kind}" for kind, n in cpu["cores"].items())
    machine.add_row("cores", cores)
    machine.add_row("cpu flags", " ".join(k for k, v in cpu["flags"].items() if v) or "-")

    devices = Table("type", "name", "memory", "capability", title="devices")
    for device in info["devices"]:
        memory = f"{device['memory_bytes'] / 2**30:.1f} GiB"
        devices.add_row(
            device["type"], escape(device["name"]), memory, device.get("capability", "")
        )

    backends = Table("backend", "available", "version", "reason", title="backends")
    for name, backend in info["backends"].items():
        # escape: reasons hold pip hints like openpto[tui], which Rich would read as markup
        backends.add_row(name, _mark(backend), backend["version"] or "", escape(backend["reason"]))

    quant = Table("backend", "available", "reason", title="quantization backends (--backend)")
    for name, backend in info["quantization_backends"].items():
        quant.add_row(name, _mark(backend), escape(backend["reason"]))

    console = Console()
    for table in (machine, devices, backends, quant):
        console.print(table)
    console.print(f"run {info['run_id']}", style="dim")


def _mark(backend: dict[str, Any]) -> str:
    return "[green]yes[/green]" if backend["available"] else "[red]no[/red]"
