"""Round-to-nearest: min/max scales per row (and group), no calibration data.

The reported error of each Linear is the relative weight error ``||W - W'||^2 / ||W||^2`` (RTN
sees no activations, so it has no output error to report).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from openpto.core.calibrate import (
    CompressionResult,
    LayerCallback,
    LayerEvent,
    LinearReport,
    decoder_layers,
    find_linears,
)
from openpto.core.quant.configs import RTNConfig
from openpto.core.quant.tensor import quantize_weight
from openpto.errors import UnsupportedModel


def rtn_linear(linear: nn.Linear, config: RTNConfig, device: torch.device) -> tuple[float, object]:
    w = linear.weight.data.to(device)
    qw = quantize_weight(w, config.bits, config.group_size, config.symmetric)
    w_hat = qw.dequantize()
    err = float((w.float() - w_hat).pow(2).sum() / w.float().pow(2).sum().clamp_min(1e-30))
    linear.weight.data = w_hat.to(linear.weight.device, linear.weight.dtype)
    return err, qw.to("cpu")


@torch.no_grad()
def rtn_transform(
    model: nn.Module,
    config: RTNConfig,
    calibration: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    on_layer: LayerCallback | None = None,
) -> CompressionResult:
    """Quantize every Linear of every decoder layer in place (weights become their dequantized
    values); ``calibration`` is ignored."""
    started = time.perf_counter()
    prefix, layers = decoder_layers(model)
    exec_device = torch.device(device) if device is not None else next(model.parameters()).device
    reports: list[LinearReport] = []
    for index, layer in enumerate(layers):
        layer_started = time.perf_counter()
        linears = find_linears(layer)
        if not linears:
            raise UnsupportedModel(
                f"decoder layer {index} of {type(model).__name__} has no Linear layers"
            )
        layer_reports = []
        for name, linear in linears.items():
            t0 = time.perf_counter()
            err, qw = rtn_linear(linear, config, exec_device)
            layer_reports.append(
                LinearReport(
                    index, f"{prefix}.{index}.{name}", err, time.perf_counter() - t0, quantized=qw
                )
            )
        reports.extend(layer_reports)
        if on_layer is not None:
            on_layer(
                LayerEvent(
                    index, len(layers), time.perf_counter() - layer_started, layer_reports, None
                )
            )
    return CompressionResult.since(started, config, reports, exec_device)
