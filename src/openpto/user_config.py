"""User defaults in ``OPT_HOME/config.toml``: read by the CLI for its option defaults, written by
the TUI's Settings screen. The file looks like::

    [defaults]          # any option of any ``opt`` command, by its parameter name
    model = "smollm2-135m"
    device = "cpu"
    calib = "pydoc-topics"

    [tui]
    theme = "dark"      # dark or light

    [tui.keys]          # action name -> key, e.g. quantize = "ctrl+q"
    quantize = "q"

Reading needs only the standard library (no torch); writing goes through a temporary file and
an atomic rename, so a crash mid-write never leaves half a file.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openpto.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

THEMES = ("dark", "light")
Scalar = str | int | float | bool


def config_path() -> Path:
    """``OPT_HOME/config.toml`` (``OPT_HOME`` defaults to ``~/.openpto``)."""
    home = os.environ.get("OPT_HOME") or str(Path.home() / ".openpto")
    return Path(home).expanduser() / "config.toml"


@dataclass
class UserConfig:
    """The file's content: ``defaults`` for commands, ``theme`` and ``keys`` for the TUI."""

    defaults: dict[str, Scalar] = field(default_factory=dict)
    theme: str = "dark"
    keys: dict[str, str] = field(default_factory=dict)
    #: sections and keys this version does not know, written back unchanged
    extra: dict[str, Any] = field(default_factory=dict)

    def to_toml_dict(self) -> dict[str, Any]:
        tui: dict[str, Any] = {k: v for k, v in self.extra.get("tui", {}).items()
                               if k not in ("theme", "keys")}
        tui["theme"] = self.theme
        if self.keys:
            tui["keys"] = dict(self.keys)
        out: dict[str, Any] = {k: v for k, v in self.extra.items() if k != "tui"}
        out["defaults"] = dict(self.defaults)
        out["tui"] = tui
        return out


def load(path: Path | None = None) -> UserConfig:
    """The user config (empty defaults when the file does not exist); a file that is not valid
    TOML, or holds values of the wrong kind, is one ``UsageError`` naming the file."""
    path = path if path is not None else config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return UserConfig()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from exc
    return from_dict(data, str(path))


def from_dict(data: Mapping[str, Any], where: str = "config.toml") -> UserConfig:
    defaults = data.get("defaults", {})
    tui = data.get("tui", {})
    if not isinstance(defaults, dict) or not isinstance(tui, dict):
        raise UsageError(f"{where}: [defaults] and [tui] must be tables")
    for key, value in defaults.items():
        if not isinstance(value, (str, int, float, bool)):
            raise UsageError(f"{where}: [defaults] {key} must be a string, number or boolean")
    theme = tui.get("theme", "dark")
    if theme not in THEMES:
        raise UsageError(f"{where}: [tui] theme must be one of {', '.join(THEMES)}, not {theme!r}")
    keys = tui.get("keys", {})
    if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
        raise UsageError(f"{where}: [tui.keys] maps action names to key names (strings)")
    extra = {k: v for k, v in data.items() if k != "defaults"}
    return UserConfig(defaults=dict(defaults), theme=theme, keys=dict(keys), extra=extra)


def save(config: UserConfig, path: Path | None = None) -> Path:
    """Write the config atomically (a temporary file in the same folder, then a rename)."""
    path = path if path is not None else config_path()
    text = dumps(config.to_toml_dict())
    from_dict(tomllib.loads(text), str(path))  # never write what load() would refuse
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".toml", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def dumps(data: Mapping[str, Any]) -> str:
    """TOML for tables of scalars (nested tables allowed), which is all this file holds."""
    lines: list[str] = []
    _table(lines, [], data)
    return "\n".join(lines).lstrip("\n") + "\n"


def _table(lines: list[str], prefix: list[str], data: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    if prefix:
        lines.append("")
        lines.append("[" + ".".join(_key(p) for p in prefix) + "]")
    for key, value in scalars.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in tables.items():
        _table(lines, [*prefix, key], value)


def _key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes are all valid in TOML basic strings.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise UsageError(f"cannot write {value!r} to config.toml (strings, numbers, booleans only)")


def command_default_map(command_names: list[str], path: Path | None = None) -> dict[str, Any]:
    """A click ``default_map`` giving every command the ``[defaults]`` values: click looks up
    only the names of a command's own parameters, so a key another command lacks is harmless."""
    defaults = load(path).defaults
    if not defaults:
        return {}
    return {name: dict(defaults) for name in command_names}
