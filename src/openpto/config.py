"""Method configs: frozen dataclasses that serialise to a versioned dict and back.

Every method config subclasses ``MethodConfig``; ``to_dict`` writes ``{"type": ..., "version": ...,
**fields}`` and ``config_from_dict`` rebuilds the exact config, so a run's stored config can be
replayed. Configs register themselves by their ``type_name``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from openpto.errors import ConfigError

C = TypeVar("C", bound="MethodConfig")

_CONFIG_TYPES: dict[str, type[MethodConfig]] = {}


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    type_name: ClassVar[str] = "method"
    version: ClassVar[int] = 1

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
