"""Registries keyed by type or name, so that dispatch never needs an if/elif on strings.

A ``TypeRegistry`` maps a config class to the transform that applies it (torchao's shape:
``quantize_(model, GPTQConfig(...))`` finds the GPTQ transform by the config's type). A
``NameRegistry`` maps a user-facing name (``"gptq"``, ``"packed-int4-cpu"``) to a factory; entries
may be registered lazily as ``"module:attr"`` strings so that nothing heavy is imported until used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from openpto.errors import UsageError

T = TypeVar("T")


class TypeRegistry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[type, T] = {}

    def register(self, key: type) -> Callable[[T], T]:
        def decorator(value: T) -> T:
            self._entries[key] = value
            return value

        return decorator

    def lookup(self, key: type) -> T:
        for klass in key.__mro__:
            if klass in self._entries:
                return self._entries[klass]
        known = ", ".join(sorted(k.__name__ for k in self._entries))
        raise UsageError(f"no {self.what} is registered for {key.__name__} (known: {known})")

    def __contains__(self, key: type) -> bool:
        return any(k in self._entries for k in key.__mro__)

    def keys(self) -> list[type]:
        return list(self._entries)


class NameRegistry(Generic[T]):
    """Names to values; a value given as ``"package.module:attr"`` is imported on first lookup."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T | str] = {}

    def register(self, name: str, value: T | str | None = None) -> Any:
        if value is not None:
            self._entries[name] = value
            return value

        def decorator(obj: T) -> T:
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries))
            raise UsageError(f"unknown {self.what} {name!r} (known: {known})")
        value = self._entries[name]
        if isinstance(value, str):
            module_name, _, attr = value.partition(":")
            value = getattr(importlib.import_module(module_name), attr)
            self._entries[name] = value
        return value  # type: ignore[return-value]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# The project's registries. They live here, below every layer, so that algorithms can register
# themselves and front ends can look them up without importing each other.

#: config type -> transform ``(model, config, calibration, on_layer) -> CompressionResult``
TRANSFORMS: TypeRegistry = TypeRegistry("transform")
#: kernel name -> factory of a packed Linear implementation (see ``openpto.kernels``)
KERNELS: NameRegistry = NameRegistry("kernel")
#: backend name (``torch``, ``bitsandbytes``, ``quanto``, ``mlx``, ...) -> quantization backend
QUANT_BACKENDS: NameRegistry = NameRegistry("quantization backend")
#: artifact format (``openpto.json`` "format") -> loader that makes a loaded folder runnable
ARTIFACT_LOADERS: NameRegistry = NameRegistry("artifact format")

# Built-in artifact formats; each loader is imported only when an artifact of its format loads.
ARTIFACT_LOADERS.register("pack-quantized", "openpto.models.artifact_loaders:load_pack_quantized")
ARTIFACT_LOADERS.register("sparse-bitmask", "openpto.models.artifact_loaders:load_sparse")
ARTIFACT_LOADERS.register("sparse-24-bitmask", "openpto.models.artifact_loaders:load_sparse")
ARTIFACT_LOADERS.register("bitsandbytes", "openpto.models.artifact_loaders:load_bitsandbytes")
ARTIFACT_LOADERS.register("quanto", "openpto.models.artifact_loaders:load_quanto")
ARTIFACT_LOADERS.register("mlx", "openpto.models.artifact_loaders:load_mlx")
