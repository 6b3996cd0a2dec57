"""``--config FILE``, ``--set FIELD=VALUE`` and ``--show-config``: every field of every method
config reachable from the command line.

A command builds its config from its own flags, then applies the file's fields, then each
``--set`` in order; values are parsed by the field's declared type, and an unknown field or a
bad value is one ``UsageError`` naming the config and the field.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TypeVar

import typer

from openpto.config import (
    MethodConfig,
    build,
    describe_config,
    parse_assignments,
    parse_field,
    read_config_file,
)

C = TypeVar("C", bound=MethodConfig)

CONFIG_HELP = "TOML or JSON file of the method config's fields (see --show-config)."
SET_HELP = "Set one field of the method config, e.g. --set damp=0.02 (repeatable)."
SHOW_HELP = "Print the resolved method config, each field with a description, and exit."


def config_file_option() -> Any:
    return typer.Option(None, "--config", help=CONFIG_HELP, metavar="FILE")


def set_option() -> Any:
    return typer.Option([], "--set", help=SET_HELP, metavar="FIELD=VALUE")


def show_option() -> Any:
    return typer.Option(False, "--show-config", help=SHOW_HELP)


def config_values(cls: type[MethodConfig], flags: dict[str, Any], config_file: str | None,
                  sets: list[str] | None) -> tuple[dict[str, Any], set[str]]:
    """The field values a command's config is built from: its flags, then the file's fields,
    then each ``--set`` in order (later ones win), each checked against the field's type; also
    the fields that the file and ``--set`` named."""
    label = cls.type_name
    values = {name: parse_field(cls, name, value) for name, value in flags.items()}
    named: set[str] = set()
    if config_file is not None:
        from_file = read_config_file(config_file, label)
        values.update({name: parse_field(cls, name, v) for name, v in from_file.items()})
        named |= set(from_file)
    if sets:
        assigned = parse_assignments(sets, label)
        values.update({name: parse_field(cls, name, v) for name, v in assigned.items()})
        named |= set(assigned)
    return values, named


def resolve_config(cls: type[C], flags: dict[str, Any], config_file: str | None,
                   sets: list[str] | None) -> C:
    """The config built from ``config_values`` (one ``UsageError`` naming the config and field
    when a value does not fit)."""
    values, _ = config_values(cls, flags, config_file, sets)
    return build(cls, values)


def data_options(calib: str | None, samples: int, calib_seq_len: int,
                 eval_text: str | None) -> dict[str, Any]:
    """The calibration and evaluation options of a quantize or sparsify command line."""
    import openpto

    return {
        "calibration": openpto.CalibrationOptions(text=calib, samples=samples,
                                                  seq_len=calib_seq_len),
        "evaluation": openpto.EvalOptions(text=eval_text) if eval_text is not None else None,
    }


def show_config(config: MethodConfig, as_json: bool) -> None:
    """The config as ``--show-config`` prints it: one JSON object (``type``, ``version``,
    ``description``, ``fields``: name, type, value, help), or a table for people."""
    doc = " ".join((type(config).__doc__ or "").strip().split("\n\n")[0].split())
    fields = describe_config(config)
    if as_json:
        data = {"type": config.type_name, "version": config.version, "description": doc,
                "config": config.to_dict(),
                "fields": [{**f.to_dict(), "value": f.to_dict()["default"],
                            "default": _default(type(config), f.name)} for f in fields]}
        sys.stdout.write(json.dumps(data, default=str) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.type_name} (version {config.version}): {doc}")
    for column in ("field", "type", "value", "default", "description"):
        table.add_column(column)
    for f in fields:
        default = _default(type(config), f.name)
        table.add_row(f.name, f.type, repr(f.default), repr(default), f.help)
    Console().print(table)


def _default(cls: type, name: str) -> Any:
    for f in describe_config(cls):
        if f.name == name:
            return f.to_dict()["default"]
    return None
