"""The pruning transforms: one ``LayerCompressor`` per method, driven layer by layer.

Magnitude pruning needs no data and walks the decoder layers directly. Wanda and SparseGPT run
through ``run_layer_sequential``: the calibration samples pass through each layer once with hooks
on its Linears, every Linear of the layer is pruned from those statistics, and the pruned layer's
outputs feed the next layer. Linears that read the very same input tensor (q/k/v, gate/up) share
one set of statistics, which saves the Hessians of k, v and up on Llama-like layers.

``LinearReport.error`` per method: magnitude — the fraction of the weight's squared norm removed;
Wanda — ``sum_ij W_ij^2 ||X_j||^2 / tokens`` over pruned weights (the output error if inputs were
uncorrelated); SparseGPT — its OBS loss (see ``openpto.core.sparsity.sparsegpt``).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from torch import nn

from openpto.core.calibrate import (
    CompressionResult,
    LayerCallback,
    LayerEvent,
    LinearReport,
    RunLayer,
    decoder_layers,
    find_linears,
    run_layer_sequential,
)
from openpto.core.hessian import HessianAccumulator
from openpto.core.quant.common import collect_inputs
from openpto.core.sparsity.configs import (
    MagnitudeConfig,
    SparseGPTConfig,
    SparsityConfig,
    WandaConfig,
    check_nm_width,
)
from openpto.core.sparsity.masks import layer_mask, nm_mask, row_mask
from openpto.core.sparsity.sparsegpt import sparsegpt
from openpto.errors import DataError


class SquaredNorms:
    """``sum_t x_tj^2`` per input column: the diagonal of ``X X^T``, all that Wanda needs.

    ``HessianAccumulator.column_norms`` gives the same numbers, but accumulating the full Hessian
    costs ``in_features`` times more work for a statistic that only uses its diagonal.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.columns = columns
        self.sums = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.columns).float()
        self.tokens += x.shape[0]
        self.sums += x.pow(2).sum(dim=0).double()

    def column_norms(self) -> torch.Tensor:
        return self.sums.sqrt().float()


#: what pruning one Linear gives: (new weight float32, keep mask, QuantizedWeight or None, error)
Pruned = tuple[torch.Tensor, torch.Tensor, Any, float]


class _Pruner:
    """Shared per-layer loop; subclasses say how one Linear is pruned."""

    needs_data = True
    #: what each Linear's calibration inputs are accumulated into (None: none are)
    accumulator: ClassVar[type[SquaredNorms] | type[HessianAccumulator] | None] = None

    def __init__(self, config: SparsityConfig) -> None:
        self.config = config

    def statistics(self, linears: dict[str, nn.Linear], run_layer: RunLayer) -> dict[str, Any]:
        """Name -> the accumulated inputs of that Linear, after one pass of the layer."""
        make = type(self).accumulator
        return {} if make is None else collect_inputs(linears, run_layer, make)

    def prune(self, weight: torch.Tensor, stats: Any) -> Pruned:
        raise NotImplementedError

    def compress_layer(
        self, index: int, prefix: str, layer: nn.Module, run_layer: RunLayer
    ) -> list[LinearReport]:
        linears = find_linears(layer)
        nm = self.config.nm
        if nm is not None:
            for name, linear in linears.items():
                check_nm_width(linear.in_features, nm, f"{prefix}.{name}")
        stats = self.statistics(linears, run_layer) if self.needs_data else {}
        reports = []
        for name, linear in linears.items():
            started = time.perf_counter()
            weight, mask, quantized, error = self.prune(linear.weight.data, stats.get(name))
            linear.weight.data = weight.to(linear.weight.dtype)
            zeros = int((linear.weight.data == 0).sum())
            reports.append(
                LinearReport(
                    layer_index=index,
                    name=f"{prefix}.{name}",
                    error=error,
                    seconds=time.perf_counter() - started,
                    quantized=quantized.to("cpu") if quantized is not None else None,
                    mask=mask.cpu(),
                    extra={"zeros": zeros, "sparsity": zeros / linear.weight.numel()},
                )
            )
        return reports


class MagnitudePruner(_Pruner):
    needs_data = False
    config: MagnitudeConfig

    def prune(self, weight: torch.Tensor, stats: Any) -> Pruned:
        w = weight.float()
        scores = w.abs()
        if self.config.nm is not None:
            mask = nm_mask(scores, *self.config.nm)
        elif self.config.scope == "row":
            mask = row_mask(scores, self.config.target_sparsity)
        else:
            mask = layer_mask(scores, self.config.target_sparsity)
        removed = float(w[~mask].double().pow(2).sum() / w.double().pow(2).sum().clamp_min(1e-300))
        return w * mask, mask, None, removed


class WandaPruner(_Pruner):
    config: WandaConfig
    accumulator = SquaredNorms

    def prune(self, weight: torch.Tensor, stats: Any) -> Pruned:
        w = weight.float()
        norms = stats.column_norms().to(w.device)
        scores = w.abs() * norms.unsqueeze(0)
        if self.config.nm is not None:
            mask = nm_mask(scores, *self.config.nm)
        else:
            mask = row_mask(scores, self.config.target_sparsity)
        error = float(scores[~mask].double().pow(2).sum() / max(stats.tokens, 1))
        return w * mask, mask, None, error


class SparseGPTPruner(_Pruner):
    config: SparseGPTConfig
    accumulator = HessianAccumulator

    def prune(self, weight: torch.Tensor, stats: Any) -> Pruned:
        cfg = self.config
        result = sparsegpt(
            weight,
            stats.H,
            sparsity=cfg.sparsity if cfg.nm is None else None,
            nm=cfg.nm,
            block_size=cfg.block_size,
            damp=cfg.damp,
            bits=cfg.bits,
            group_size=cfg.group_size,
            symmetric=cfg.symmetric,
        )
        return result.weight, result.mask, result.quantized, result.loss


_PRUNERS: dict[type[SparsityConfig], type[_Pruner]] = {
    MagnitudeConfig: MagnitudePruner,
    WandaConfig: WandaPruner,
    SparseGPTConfig: SparseGPTPruner,
}


def check_widths(model: nn.Module, config: SparsityConfig) -> None:
    """Refuse an N:M pattern whose M does not divide some decoder Linear's input width."""
    if config.nm is None:
        return
    prefix, layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        for name, linear in find_linears(layer).items():
            check_nm_width(linear.in_features, config.nm, f"{prefix}.{index}.{name}")


def needs_calibration(config: SparsityConfig) -> bool:
    return _PRUNERS[type(config)].needs_data


def _run_data_free(
    model: nn.Module, pruner: _Pruner, on_layer: LayerCallback | None
) -> list[LinearReport]:
    prefix, layers = decoder_layers(model)

    def no_data() -> None:
        raise DataError(f"{pruner.config.type_name} pruning runs without calibration data")

    reports: list[LinearReport] = []
    for index, layer in enumerate(layers):
        started = time.perf_counter()
        layer_reports = pruner.compress_layer(index, f"{prefix}.{index}", layer, no_data)
        reports.extend(layer_reports)
        if on_layer is not None:
            seconds = time.perf_counter() - started
            on_layer(LayerEvent(index, len(layers), seconds, layer_reports, None))
    return reports


@torch.no_grad()
def sparsify_model(
    model: nn.Module,
    config: SparsityConfig,
    calibration: torch.Tensor | None = None,
    on_layer: LayerCallback | None = None,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 8,
) -> CompressionResult:
    """Prune every Linear of every decoder layer of ``model`` in place.

    ``calibration`` is a LongTensor ``[samples, seq_len]`` of token ids (ignored by magnitude
    pruning); ``device`` is where each layer is processed (default: where the model is).
    """
    started = time.perf_counter()
    check_widths(model, config)
    pruner = _PRUNERS[type(config)](config)
    if not pruner.needs_data:
        reports = _run_data_free(model, pruner, on_layer)
        used = str(next(model.parameters()).device)
    else:
        if calibration is None or calibration.numel() == 0:
            raise DataError(f"{config.type_name} pruning needs calibration samples")
        reports = run_layer_sequential(
            model, calibration, pruner, device=device, batch_size=batch_size, on_layer=on_layer
        )
        used = str(device) if device is not None else str(next(model.parameters()).device)
    return CompressionResult.since(started, config, reports, used)

