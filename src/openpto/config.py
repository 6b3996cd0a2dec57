"""Method configs: frozen dataclasses that serialise to a versioned dict and back.

Every method config subclasses ``MethodConfig``; ``to_dict`` writes ``{"type": ..., "version": ...,
**fields}`` and ``config_from_dict`` rebuilds the exact config, so a run's stored config can be
replayed. Configs register themselves by their ``type_name``.

Each field carries a one-line description (``option(default, "...")`` puts it in the field's
metadata), which ``describe_config`` and ``opt ... --show-config`` print. ``override`` applies
``{field: value}`` changes with the values checked against each field's declared type, so that
``--config FILE`` and ``--set field=value`` reach every field of every config.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from openpto.errors import ConfigError, UsageError

C = TypeVar("C", bound="MethodConfig")

_CONFIG_TYPES: dict[str, type[MethodConfig]] = {}


def option(default: Any, help: str) -> Any:
    """A config field with its default and a one-line description (shown by --show-config)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    type_name: ClassVar[str] = "method"
    version: ClassVar[int] = 1
    #: whether the method reads calibration data (RTN and magnitude pruning do not)
    needs_calibration: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "type_name" in cls.__dict__:
            _CONFIG_TYPES[cls.type_name] = cls

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": self.type_name, "version": self.version, **fields}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, MethodConfig):
        return value.to_dict()
    return value


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    data = dict(data)
    type_name = data.pop("type", None)
    version = data.pop("version", None)
    known = registered_config_types()
    if type_name not in known:
        raise ConfigError(f"unknown config type {type_name!r} (known: {sorted(known)})")
    cls = known[type_name]
    if version is not None and version > cls.version:
        raise ConfigError(
            f"config {type_name!r} has version {version}, newer than this openpto's {cls.version}"
        )
    field_types = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in field_types:
            raise ConfigError(f"config {type_name!r} has no field {name!r}")
        if isinstance(value, dict) and "type" in value:
            value = config_from_dict(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def registered_config_types() -> dict[str, type[MethodConfig]]:
    """``type_name`` -> config class: every method the plugins registered (and any other
    ``MethodConfig`` subclass defined so far, such as a method's nested configs)."""
    from openpto.registry import TRANSFORMS

    methods = {cls.type_name: cls for cls in TRANSFORMS if issubclass(cls, MethodConfig)}
    return {**_CONFIG_TYPES, **methods}


# ---------------------------------------------------------------------------------------------
# Field descriptions, types and overrides


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One field of a config: its name, declared type (as written), default and description."""

    name: str
    type: str
    default: Any
    help: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "default": _plain(self.default),
                "help": self.help}


def field_help(cls: type, name: str) -> str:
    """A field's description: its own metadata, else that of the same field in a base class
    (a subclass that only changes a default keeps its base's description)."""
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        for f in dataclasses.fields(klass):
            if f.name == name and f.metadata.get("help"):
                return str(f.metadata["help"])
    return ""


def _hints(cls: type) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, vars(module) if module else None)


def describe_config(config: type | Any) -> list[FieldInfo]:
    """The fields of a config class or instance; an instance's values stand in for the defaults."""
    cls = config if isinstance(config, type) else type(config)
    hints = _hints(cls)
    infos = []
    for f in dataclasses.fields(cls):
        if isinstance(config, type):
            default = f.default if f.default is not dataclasses.MISSING else None
        else:
            default = getattr(config, f.name)
        infos.append(FieldInfo(f.name, _type_name(hints.get(f.name, Any)), default,
                               field_help(cls, f.name)))
    return infos


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{_type_name(args[0])}, ...]"
        return f"tuple[{', '.join(_type_name(a) for a in args)}]"
    return str(tp).replace("typing.", "")


class _BadValue(ValueError):
    pass


def _convert(value: Any, tp: Any) -> Any:
    """``value`` (text from --set, or a TOML/JSON value) as type ``tp``; ``_BadValue`` if not."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # None first ("none"/"null" mean None wherever None is allowed), then the declared order,
        # except that text is tried last so "64" becomes 64 in ``int | str``.
        order = sorted(args, key=lambda a: (a is not type(None), a is str))
        for arg in order:
            try:
                return _convert(value, arg)
            except _BadValue:
                continue
        raise _BadValue(f"expected {_type_name(tp)}")
    if origin is typing.Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise _BadValue(f"expected one of {', '.join(map(repr, args))}")
    if origin is tuple:
        items = _split_sequence(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in items)
        if len(items) != len(args):
            raise _BadValue(f"expected {len(args)} items")
        return tuple(_convert(v, a) for v, a in zip(items, args, strict=True))
    if tp is type(None):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        raise _BadValue("expected None")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise _BadValue("expected true or false")
    if tp is int or tp is float:
        return _number(value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _BadValue("expected text")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _BadValue(f"expected {_type_name(tp)}")


_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False,
          "1": True, "0": False}


def _number(value: Any, tp: type[int] | type[float]) -> int | float:
    """``value`` as ``tp``: a number of that kind (a float field takes an int too, a bool is no
    number) or a string that spells one."""
    if isinstance(value, int if tp is int else (int, float)) and not isinstance(value, bool):
        return tp(value)
    if isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
    raise _BadValue("expected an integer" if tp is int else "expected a number")


def _split_sequence(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _BadValue(f"not a JSON list: {exc}") from exc
            if isinstance(parsed, list):
                return parsed
        text = text.strip("()")
        return [part.strip() for part in text.split(",") if part.strip()]
    raise _BadValue("expected a list")


def parse_field(cls: type, name: str, value: Any) -> Any:
    """``value`` converted to field ``name``'s declared type; a ``UsageError`` naming the config
    and the field when the field does not exist or the value does not fit."""
    label = getattr(cls, "type_name", cls.__name__)
    names = [f.name for f in dataclasses.fields(cls)]
    if name not in names:
        raise UsageError(
            f"the {label} config has no field {name!r} (fields: {', '.join(names)})"
        )
    tp = _hints(cls).get(name, Any)
    try:
        return _convert(value, tp)
    except _BadValue as exc:
        raise UsageError(
            f"the {label} config's field {name!r} takes {_type_name(tp)}: {value!r} "
            f"does not fit ({exc})"
        ) from None


def build(cls: type[C], values: Mapping[str, Any]) -> C:
    """``cls(**values)`` with each value converted to its field's type; an unknown field, a value
    of the wrong type, or one the config refuses is one ``UsageError`` naming the config."""
    kwargs = {name: parse_field(cls, name, value) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        label = getattr(cls, "type_name", cls.__name__)
        raise UsageError(f"the {label} config: {exc}") from None


def override(config: C, values: Mapping[str, Any]) -> C:
    """``config`` with ``values`` (field -> value, each converted to its field's type) replaced;
    a value its config refuses becomes one ``UsageError`` naming the config."""
    cls = type(config)
    changes = {name: parse_field(cls, name, value) for name, value in values.items()}
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError as exc:
        label = getattr(cls, "type_name", cls.__name__)
        raise UsageError(f"the {label} config: {exc}") from None


def parse_assignments(assignments: list[str] | tuple[str, ...], label: str) -> dict[str, str]:
    """``["damp=0.02", "act_order=false"]`` -> ``{"damp": "0.02", "act_order": "false"}``."""
    values: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set takes FIELD=VALUE for the {label} config, not {item!r}")
        values[key.strip()] = value.strip()
    return values


def _toml() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib


def read_config_file(path: str | Path, label: str) -> dict[str, Any]:
    """A config file's fields: TOML (``.toml``) or JSON (anything else); ``type``/``version``
    keys, if present, must name the config they are applied to."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            data: Any = _toml().loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError both are
        raise UsageError(f"the config file {path} is not valid "
                         f"{'TOML' if path.suffix.lower() == '.toml' else 'JSON'}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"the config file {path} must hold a table of fields, not "
                         f"{type(data).__name__}")
    data = dict(data)
    declared = data.pop("type", None)
    data.pop("version", None)
    if declared is not None and declared != label:
        raise UsageError(f"the config file {path} is for {declared!r}, not the {label} config")
    return data
