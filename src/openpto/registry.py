"""Registries keyed by type or name, so that dispatch never needs an if/elif on strings.

A ``TypeRegistry`` maps a config class to the transform that applies it (torchao's shape:
``quantize_(model, GPTQConfig(...))`` finds the GPTQ transform by the config's type). A
``NameRegistry`` maps a user-facing name (``"gptq"``, ``"packed-int4-cpu"``) to a class or
function. Entries may be ``"module:attr"`` strings, imported on first use, so that nothing heavy
is imported until asked for.

Nothing registers here directly: ``openpto.plugins`` fills every registry from the plugins' hooks
(the built-ins in ``openpto.default_plugins`` and the installed ``openpto.plugins`` entry points)
the first time any registry is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from openpto.errors import PluginError, UsageError

T = TypeVar("T")

def _ensure_plugins() -> None:
    from openpto.plugins import load_plugins

    load_plugins()


def _import(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    module_name, _, attr = value.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _import_entry(value: Any, what: str, name: str, plugin: str) -> Any:
    """An entry's object; one that cannot be imported is a ``PluginError`` naming its plugin
    (a ``MissingDependency`` raised by the module itself passes through as it is)."""
    try:
        return _import(value)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"{what} {name!r} of plugin {plugin!r} cannot be imported from "
                          f"{value!r}: {type(exc).__name__}: {exc}") from exc


class NameRegistry(Generic[T]):
    """Names to values; a value given as ``"package.module:attr"`` is imported on first lookup."""

    def __init__(self, what: str, hook: str) -> None:
        self.what = what
        #: the hookspec (``openpto.hookspecs``) whose implementations fill this registry
        self.hook = hook
        self._entries: dict[str, T | str] = {}
        self._owners: dict[str, str] = {}

    def check_new(self, name: str, plugin: str) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.what} without a name")
        if name in self._entries:
            raise PluginError(f"plugin {plugin!r} registers {self.what} {name!r}, which plugin "
                              f"{self._owners[name]!r} registered already")

    def add(self, name: str, value: T | str, plugin: str) -> None:
        self.check_new(name, plugin)
        self._entries[name] = value
        self._owners[name] = plugin

    def clear(self) -> None:
        self._entries.clear()
        self._owners.clear()

    def get(self, name: str) -> T:
        _ensure_plugins()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries))
            raise UsageError(f"unknown {self.what} {name!r} (known: {known})")
        value = _import_entry(self._entries[name], self.what, name, self._owners[name])
        self._entries[name] = value
        return value  # type: ignore[no-any-return]

    def names(self) -> list[str]:
        _ensure_plugins()
        return sorted(self._entries)

    def owners(self) -> dict[str, str]:
        """Each registered name -> the plugin that registered it."""
        _ensure_plugins()
        return dict(self._owners)

    def __contains__(self, name: object) -> bool:
        _ensure_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


class TypeRegistry(Generic[T]):
    """Config types to transforms, looked up along the MRO. Keys and values may be
    ``"module:attr"`` strings: a key is imported when the registry is first read by type (the
    config modules are light), a value when it is looked up."""

    def __init__(self, what: str, hook: str) -> None:
        self.what = what
        self.hook = hook
        self._pending: list[tuple[str, T | str, str]] = []
        self._entries: dict[type, T | str] = {}
        self._owners: dict[type, str] = {}

    def check_new(self, key: type | str, plugin: str) -> None:
        if isinstance(key, str):
            return  # checked once imported, in _resolve
        if not isinstance(key, type) or not isinstance(key.__dict__.get("type_name"), str):
            raise PluginError(f"plugin {plugin!r} registered {key!r} as a {self.what} key: "
                              "it must be a config class with its own type_name")
        self._check_type(key, plugin)

    def _check_type(self, key: type, plugin: str) -> None:
        for known, owner in self._owners.items():
            if known is key or known.__dict__["type_name"] == key.__dict__["type_name"]:
                raise PluginError(
                    f"plugin {plugin!r} registers {key.__name__} (type_name "
                    f"{key.__dict__['type_name']!r}), which plugin {owner!r} registered already"
                )

    def add(self, key: type | str, value: T | str, plugin: str) -> None:
        self.check_new(key, plugin)
        if isinstance(key, str):
            self._pending.append((key, value, plugin))
        else:
            self._entries[key] = value
            self._owners[key] = plugin

    def clear(self) -> None:
        self._pending.clear()
        self._entries.clear()
        self._owners.clear()

    def _resolve(self) -> None:
        _ensure_plugins()
        while self._pending:
            key, value, plugin = self._pending.pop(0)
            try:
                klass = _import(key)
                self.check_new(klass, plugin)
            except (ImportError, AttributeError, PluginError) as exc:
                from openpto.plugins import report_failure

                report_failure(plugin, exc, f"its {self.what} key {key!r}")
                continue
            self._entries[klass] = value
            self._owners[klass] = plugin

    def lookup(self, key: type) -> T:
        self._resolve()
        for klass in key.__mro__:
            if klass in self._entries:
                value = _import_entry(self._entries[klass], self.what, klass.__name__,
                                      self._owners[klass])
                self._entries[klass] = value
                return value  # type: ignore[no-any-return]
        known = ", ".join(sorted(k.__name__ for k in self._entries))
        raise UsageError(f"no {self.what} is registered for {key.__name__} (known: {known})")

    def __contains__(self, key: type) -> bool:
        self._resolve()
        return any(k in self._entries for k in key.__mro__)

    def keys(self) -> list[type]:
        self._resolve()
        return list(self._entries)

    def __iter__(self) -> Iterator[type]:
        return iter(self.keys())

    def owners(self) -> dict[type, str]:
        self._resolve()
        return dict(self._owners)


# The project's registries. They live here, below every layer, so that algorithms and front ends
# find each other's entries without importing each other.

#: config type -> transform
#: ``(model, config, calibration, *, device, on_layer) -> CompressionResult``
TRANSFORMS: TypeRegistry[Any] = TypeRegistry("method", "register_methods")
#: backend name (``torch``, ``bitsandbytes``, ``quanto``, ``mlx``, ...) -> ``QuantBackend`` class
QUANT_BACKENDS: NameRegistry[Any] = NameRegistry(
    "quantization backend", "register_quantization_backends"
)
#: kernel name -> ``Kernel`` class running packed Linears (see ``openpto.kernels``)
KERNELS: NameRegistry[Any] = NameRegistry("kernel", "register_kernels")
#: artifact format (``openpto.json`` "format") -> ``loader(ArtifactRequest) -> LoadedModel``
ARTIFACT_LOADERS: NameRegistry[Any] = NameRegistry("artifact format", "register_artifact_loaders")
#: export format -> ``writer(artifact_folder, output, qtype, log) -> details``
EXPORTERS: NameRegistry[Any] = NameRegistry("export format", "register_exporters")
#: generation backend name -> ``Engine`` class taking ``(model_spec, options)``
GENERATION_BACKENDS: NameRegistry[Any] = NameRegistry(
    "generation backend", "register_generation_backends"
)

REGISTRIES: tuple[NameRegistry[Any] | TypeRegistry[Any], ...] = (
    TRANSFORMS, QUANT_BACKENDS, KERNELS, ARTIFACT_LOADERS, EXPORTERS, GENERATION_BACKENDS,
)
