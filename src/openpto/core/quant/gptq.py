"""GPTQ (Frantar et al., 2022): quantize one column at a time and push each rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

One ``GPTQ`` object per Linear, as in the paper's reference: ``add_batch`` accumulates
``H = 2 X X^T / n`` (in ``openpto.core.hessian``), ``quantize`` runs the blocked column loop and
returns a ``GPTQResult``, ``free`` drops the Hessian. The reported error is the relative output
error ``||(W - W') X||^2 / ||W X||^2`` on the calibration inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from openpto.core.calibrate import (
    CompressionResult,
    LayerCallback,
    LinearReport,
    RunLayer,
    find_linears,
)
from openpto.core.hessian import HessianAccumulator, inverse_cholesky
from openpto.core.quant.common import InputCollector, relative_output_error, run_calibrated
from openpto.core.quant.configs import GPTQConfig
from openpto.core.quant.primitives import compute_qparams, resolve_group_size
from openpto.core.quant.tensor import QuantizedWeight
from openpto.registry import TRANSFORMS


@dataclass
class GPTQResult:
    quantized: QuantizedWeight  # codes in the original column order
    error: float  # relative output error on the calibration inputs
    damp: float  # dampening that made the Cholesky succeed (relative to the mean diagonal)
    perm: torch.Tensor | None  # the act-order column order used during the pass
    seconds: float


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return (torch.round(w / scale) + zero).clamp(0, maxq)


class GPTQ:
    def __init__(self, linear: nn.Linear, hessian: HessianAccumulator | None = None) -> None:
        self.linear = linear
        # Linears fed the same input (q/k/v) may share one accumulator.
        self.hessian: HessianAccumulator | None = hessian or HessianAccumulator(
            linear.in_features, device=linear.weight.device
        )

    def add_batch(self, x: torch.Tensor) -> None:
        assert self.hessian is not None, "add_batch after free()"
        self.hessian.add_batch(x)

    @torch.no_grad()
    def quantize(self, config: GPTQConfig) -> GPTQResult:
        started = time.perf_counter()
        assert self.hessian is not None, "quantize after free()"
        H0 = self.hessian.H
        H = H0
        W0 = self.linear.weight.data.float()
        W = W0.clone()
        rows, cols = W.shape
        g = resolve_group_size(cols, config.group_size)
        maxq = 2**config.bits - 1
        groups = cols // g
        scale = torch.zeros(rows, groups, device=W.device)
        zero = torch.zeros_like(scale)
        # Static groups (and per-channel, where there is one group) fix every group's grid from the
        # original weights, in the original column order: the codes then need no g_idx.
        static = config.static_groups or groups == 1
        if static:
            scale, zero = compute_qparams(W, config.bits, g, config.symmetric)

        perm = None
        if config.act_order:
            perm = torch.argsort(H.diagonal(), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
        factor = inverse_cholesky(H, config.damp)
        Hinv = factor.upper
        # A Python list: indexing a device tensor per column would sync the GPU every column.
        column = perm.tolist() if perm is not None else list(range(cols))

        Q = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
        bs = config.block_size
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = column[i1 + i]
                gi = col // g
                if not static and col % g == 0:
                    # Without act-order columns arrive in order; fix the group's grid from the
                    # weights as updated so far (the block's pending updates included).
                    current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                    s, z = compute_qparams(current, config.bits, g, config.symmetric)
                    scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
                w = W1[:, i]
                q = _round(w, scale[:, gi], zero[:, gi], maxq)
                Q[:, i1 + i] = q.to(torch.uint8)
                err = (w - (q - zero[:, gi]) * scale[:, gi]) / Hinv1[i, i]
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            # Lazy batch update: the columns after the block see all of its errors at once.
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        qw = QuantizedWeight(Q, scale, zero, config.bits, g, config.symmetric)
        error = relative_output_error(W0, qw.dequantize(), H0)
        return GPTQResult(qw, error, factor.damp, perm, time.perf_counter() - started)

    def free(self) -> None:
        self.hessian = None


class GPTQCompressor:
    """The per-layer step: one pass to collect Hessians, then GPTQ on every Linear."""

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config

    def compress_layer(
        self, index: int, prefix: str, layer: nn.Module, run_layer: RunLayer
    ) -> list[LinearReport]:
        linears = find_linears(layer)
        for linear in linears.values():
            resolve_group_size(linear.in_features, self.config.group_size)
        collector = InputCollector(
            linears, lambda lin: HessianAccumulator(lin.in_features, device=lin.weight.device)
        )
        try:
            run_layer()
        finally:
            collector.remove()
        reports = []
        for name, linear in linears.items():
            gptq = GPTQ(linear, collector.sink(name))
            result = gptq.quantize(self.config)
            linear.weight.data = result.quantized.dequantize(linear.weight.dtype)
            reports.append(
                LinearReport(
                    index,
                    f"{prefix}.{name}",
                    result.error,
                    result.seconds,
                    quantized=result.quantized.to("cpu"),
                    extra={"damp": result.damp},
                )
            )
        return reports


@TRANSFORMS.register(GPTQConfig)
def gptq_transform(
    model: nn.Module,
    config: GPTQConfig,
    calibration: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    on_layer: LayerCallback | None = None,
) -> CompressionResult:
    return run_calibrated(
        model, config, calibration, GPTQCompressor(config), device=device, on_layer=on_layer
    )
