"""The library entry points: ``quantize_(model, config)`` and ``sparsify_(model, config)``, and
the registered method configs (``method_config_type``, ``configs``).

Both look the config's type up in ``openpto.registry.TRANSFORMS`` and call the registered
transform, which modifies ``model`` in place and returns a ``CompressionResult``. A transform is
any callable ``(model, config, calibration, *, device, on_layer) -> CompressionResult``,
registered with its config through the ``register_methods`` plugin hook (``openpto.plugins``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, TypeVar

from openpto.config import MethodConfig, describe_config, registered_config_types
from openpto.errors import ConfigError, UsageError
from openpto.registry import TRANSFORMS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from openpto.core.calibrate import CompressionResult, LayerCallback

# Importing these packages defines their configs, those without a transform too (NF4Config).
_METHOD_PACKAGES = ("openpto.core.quant", "openpto.core.sparsity")


M = TypeVar("M", bound=MethodConfig)


def load_methods() -> None:
    """Import the method packages, which registers their configs and transforms."""
    for package in _METHOD_PACKAGES:
        importlib.import_module(package)


def method_config_type(name: str, base: type[M], what: str = "method") -> type[M]:
    """The registered config class called ``name`` (its ``type_name``) that subclasses ``base``;
    a ``UsageError`` naming the known ones otherwise."""
    load_methods()
    known = {n: c for n, c in registered_config_types().items() if issubclass(c, base)}
    if name not in known:
        raise UsageError(f"unknown {what} {name!r} (known: {', '.join(sorted(known))})")
    return known[name]


def configs() -> list[dict[str, Any]]:
    """Every registered method config: ``name`` (its ``type_name``), ``class``, ``kind``
    (``quantization``, ``sparsity`` or ``other``), ``description`` (its docstring's first
    paragraph), ``version``, ``has_transform``, and ``fields`` (each ``name``, ``type``,
    ``default``, ``help``)."""
    load_methods()
    from openpto.core.quant import QuantConfig
    from openpto.core.sparsity import SparsityConfig

    listed = []
    for name, cls in sorted(registered_config_types().items()):
        kind = ("quantization" if issubclass(cls, QuantConfig)
                else "sparsity" if issubclass(cls, SparsityConfig) else "other")
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        listed.append({
            "name": name, "class": f"{cls.__module__}.{cls.__qualname__}", "kind": kind,
            "description": " ".join(doc.split()), "version": cls.version,
            "has_transform": cls in TRANSFORMS,
            "fields": [f.to_dict() for f in describe_config(cls)],
        })
    return listed


def _apply(
    model: nn.Module,
    config: MethodConfig,
    calibration: torch.Tensor | None,
    device: str | torch.device | None,
    on_layer: LayerCallback | None,
) -> CompressionResult:
    load_methods()
    if getattr(config, "group_size", None) == "auto":
        raise ConfigError(
            f"{config.type_name}: group_size 'auto' is chosen by the quantize workflow from the "
            "model's widths; give 32, 64, 128 or None here"
        )
    transform = TRANSFORMS.lookup(type(config))
    result: CompressionResult = transform(
        model, config, calibration, device=device, on_layer=on_layer
    )
    return result


def quantize_(
    model: nn.Module,
    config: MethodConfig,
    calibration: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    on_layer: LayerCallback | None = None,
) -> CompressionResult:
    """Quantize ``model``'s decoder Linears in place with ``config`` (``RTNConfig``,
    ``GPTQConfig``, ``AWQConfig``, ...). ``calibration`` is a LongTensor ``[samples, seq_len]`` of
    token ids, needed by every method but RTN. The model keeps float weights holding the
    dequantized values; ``result.quantized_weights()`` has the codes for packing and saving."""
    return _apply(model, config, calibration, device, on_layer)


def sparsify_(
    model: nn.Module,
    config: MethodConfig,
    calibration: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    on_layer: LayerCallback | None = None,
) -> CompressionResult:
    """Prune ``model``'s decoder Linears in place with a sparsity config; ``result.masks()``
    holds the kept-weight masks."""
    return _apply(model, config, calibration, device, on_layer)
