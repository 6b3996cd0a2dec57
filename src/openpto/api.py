"""The library entry points: ``quantize_(model, config)`` and ``sparsify_(model, config)``.

Both look the config's type up in ``openpto.registry.TRANSFORMS`` and call the registered
transform, which modifies ``model`` in place and returns a ``CompressionResult``. A transform is
any callable ``(model, config, calibration, *, device, on_layer) -> CompressionResult``; each
method module registers its own with ``@TRANSFORMS.register(ItsConfig)``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from openpto.registry import TRANSFORMS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from openpto.config import MethodConfig
    from openpto.core.calibrate import CompressionResult, LayerCallback

# Importing these packages registers their transforms.
_METHOD_PACKAGES = ("openpto.core.quant", "openpto.core.sparsity")


def _load_methods() -> None:
    for package in _METHOD_PACKAGES:
        importlib.import_module(package)


def _apply(
    model: nn.Module,
    config: MethodConfig,
    calibration: torch.Tensor | None,
    device: str | torch.device | None,
    on_layer: LayerCallback | None,
) -> CompressionResult:
    _load_methods()
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
