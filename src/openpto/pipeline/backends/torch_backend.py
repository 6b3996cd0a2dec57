"""The ``torch`` backend: our RTN/GPTQ/AWQ through the layer-sequential driver, written as a
compressed-tensors ``pack-quantized`` artifact that loads onto packed kernels."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from openpto.errors import ConfigError, UnsupportedModel
from openpto.pipeline.artifacts import (
    FORMAT_PACKED,
    WeightPlan,
    planned_size,
    round_to_stored,
    scale_dtype_for,
    write_artifact,
)
from openpto.pipeline.backends.base import BackendOutput, LayerHook, QuantBackend, QuantRequest

if TYPE_CHECKING:
    from openpto.models import LoadedModel


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every Linear inside the decoder layers (what the methods quantize), by full name."""
    from openpto.core.calibrate import decoder_layers, find_linears

    prefix, layers = decoder_layers(model)
    found: dict[str, torch.nn.Linear] = {}
    for index, layer in enumerate(layers):
        for name, linear in find_linears(layer).items():
            found[f"{prefix}.{index}.{name}"] = linear
    if not found:
        raise UnsupportedModel(
            f"{type(model).__name__} has no Linear layers in its decoder layers: "
            "nothing to quantize"
        )
    return found


def parameter_bytes(model: torch.nn.Module,
                    stored_bytes: Callable[[torch.Tensor], int]) -> int:
    """Bytes of ``model``'s parameters (tied ones once): each decoder Linear weight as
    ``stored_bytes`` says a backend stores it, everything else at its own dtype."""
    quantized = {id(m.weight) for m in decoder_linears(model).values()}
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        total += stored_bytes(p) if id(p) in quantized else p.numel() * p.element_size()
    return total


def weight_plans(model: torch.nn.Module, request: QuantRequest) -> dict[str, WeightPlan]:
    plans = {}
    for name, linear in decoder_linears(model).items():
        group = request.group_size or linear.in_features
        plans[name] = WeightPlan(
            linear.out_features, linear.in_features, request.bits, group, request.symmetric
        )
    return plans


class TorchBackend(QuantBackend):
    name: ClassVar[str] = "torch"
    methods: ClassVar[tuple[str, ...]] = ("rtn", "gptq", "awq")
    bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
    format: ClassVar[str] = FORMAT_PACKED
    float_targets: ClassVar[bool] = True

    def availability(self) -> tuple[bool, str]:
        return True, f"torch {torch.__version__}: RTN, GPTQ and AWQ, packed int4/int8 kernels"

    def needs_calibration(self, request: QuantRequest) -> bool:
        return request.method != "rtn"

    def configure(self, request: QuantRequest) -> QuantRequest:
        """Attach the method config (``RTNConfig``/``GPTQConfig``/``AWQConfig``) by its name."""
        import openpto.core.quant  # noqa: F401  (registers the method configs)
        from openpto.config import registered_config_types

        config_type = registered_config_types().get(request.method)
        if config_type is None:
            raise ConfigError(f"no method config named {request.method!r}")
        options: dict[str, Any] = {}
        if request.float_targets is not None:
            options["float_targets"] = request.float_targets
        config = config_type(  # type: ignore[call-arg]
            bits=request.bits, group_size=request.group_size, symmetric=request.symmetric,
            **options,
        )
        return dataclasses.replace(request, config=config)

    def planned_size(self, loaded: LoadedModel, request: QuantRequest,
                     metadata: dict[str, Any]) -> int:
        model = loaded.model
        return planned_size(
            model, loaded.tokenizer, weight_plans(model, request),
            scale_dtype_for(loaded.dtype), metadata,
        )

    def quantize(
        self,
        loaded: LoadedModel,
        request: QuantRequest,
        calibration: torch.Tensor | None,
        output: Path,
        metadata: dict[str, Any],
        on_layer: LayerHook,
    ) -> BackendOutput:
        from openpto.api import quantize_

        request = request if request.config is not None else self.configure(request)
        model = loaded.model
        started = time.perf_counter()
        result = quantize_(
            model, request.config, calibration, device=request.device, on_layer=on_layer
        )
        seconds = time.perf_counter() - started
        # The model keeps computing with exactly what the artifact holds (scales and every
        # float tensor rounded to their storage dtypes), so an evaluation after quantization
        # measures the artifact.
        stored = round_to_stored(model, result.quantized_weights())
        metadata = {**metadata, "method_config": request.config.to_dict()}
        info = write_artifact(model, loaded.tokenizer, output, stored, metadata)
        return BackendOutput(
            format=info.format,
            seconds=seconds,
            model=model,
            layer_errors=[r.error for r in result.reports if r.quantized is not None],
            details={"tensor_bytes": info.tensor_bytes, "device": result.device,
                     "quantized_linears": len(stored)},
        )
