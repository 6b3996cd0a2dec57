"""What the quantization transforms share: hooks that collect Linear inputs, and the driver call."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from openpto.config import MethodConfig
from openpto.core.calibrate import (
    CompressionResult,
    LayerCallback,
    LayerCompressor,
    RunLayer,
    run_layer_sequential,
)
from openpto.errors import DataError


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``||(W - W') X||^2 / ||W X||^2`` over the calibration tokens, from ``H = 2 X X^T / n``."""
    delta = (w.float() - w_hat.float()).to(H.device)
    num = ((delta @ H) * delta).sum()
    w32 = w.float().to(H.device)
    den = ((w32 @ H) * w32).sum()
    return float(num / den) if den > 0 else float(num)


class InputCollector:
    """Forward pre-hooks that feed each Linear's input to a per-Linear sink.

    Linears that receive the very same tensor object (q/k/v after the input norm, gate/up after
    the post-attention norm) share one sink, so their statistics are accumulated once.
    """

    def __init__(
        self, linears: dict[str, nn.Linear], make_sink: Callable[[nn.Linear], Any]
    ) -> None:
        self.linears = linears
        self._make_sink = make_sink
        self.sinks: dict[str, Any] = {}
        self.shared_with: dict[str, str] = {}
        self._last: tuple[str, torch.Tensor] | None = None
        self._handles = [
            linear.register_forward_pre_hook(self._hook(name)) for name, linear in linears.items()
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if name not in self.sinks and name not in self.shared_with:
                # Decided on the first call: the layer's call structure is the same every time.
                last = self._last
                if last is not None and last[1] is x:
                    owner = self.shared_with.get(last[0], last[0])
                    self.shared_with[name] = owner
                else:
                    self.sinks[name] = self._make_sink(self.linears[name])
            self._last = (name, x)
            if name in self.sinks:
                self.sinks[name].add_batch(x.detach())

        return hook

    def sink(self, name: str) -> Any:
        return self.sinks[self.shared_with.get(name, name)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None


class Accumulator(Protocol):
    def add_batch(self, x: torch.Tensor) -> None: ...


def collect_inputs(
    linears: dict[str, nn.Linear],
    run_layer: RunLayer,
    make: Callable[[int, torch.device], Accumulator],
) -> dict[str, Any]:
    """Run the layer once and accumulate each Linear's inputs; returns name -> accumulator.

    A Linear called with the same tensor object as the Linear called just before it shares that
    one's accumulator (decided on the first call, when the layer's call order is seen).
    """
    collector = InputCollector(
        linears, lambda linear: make(linear.in_features, linear.weight.device)
    )
    try:
        run_layer()
    finally:
        collector.remove()
    missing = sorted(set(linears) - set(collector.sinks) - set(collector.shared_with))
    if missing:
        raise DataError(f"the calibration pass never reached {', '.join(missing)}")
    return {name: collector.sink(name) for name in linears}


def run_calibrated(
    model: nn.Module,
    config: MethodConfig,
    calibration: torch.Tensor | None,
    compressor: LayerCompressor,
    *,
    device: str | torch.device | None,
    on_layer: LayerCallback | None,
) -> CompressionResult:
    if calibration is None or calibration.numel() == 0:
        raise DataError(
            f"{config.type_name} needs calibration token ids (a LongTensor [samples, seq_len])"
        )
    started = time.perf_counter()
    reports = run_layer_sequential(model, calibration, compressor, device=device, on_layer=on_layer)
    where = str(device) if device is not None else str(next(model.parameters()).device)
    return CompressionResult.since(started, config, reports, where)
