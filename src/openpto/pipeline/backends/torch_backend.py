"""The ``torch`` backend: our RTN/GPTQ/AWQ through the layer-sequential driver, written as a
compressed-tensors ``pack-quantized`` artifact that loads onto packed kernels."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from openpto.errors import UnsupportedModel
from openpto.pipeline.artifacts import (
    FORMAT_PACKED,
    WeightPlan,
    planned_size,
    round_to_stored,
    scale_dtype_for,
    write_artifact,
)
from openpto.pipeline.backends.base import BackendOutput, QuantBackend, QuantizeJob

if TYPE_CHECKING:
    from openpto.core.quant import QuantConfig
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


def weight_plans(model: torch.nn.Module, config: QuantConfig) -> dict[str, WeightPlan]:
    plans = {}
    for name, linear in decoder_linears(model).items():
        group = int(config.group_size or linear.in_features)
        plans[name] = WeightPlan(
            linear.out_features, linear.in_features, config.bits, group, config.symmetric
        )
    return plans


class TorchBackend(QuantBackend):
    """Any quantization config whose transform is registered (RTN, GPTQ, AWQ and plugins')."""

    name: ClassVar[str] = "torch"
    bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
    format: ClassVar[str] = FORMAT_PACKED

    def method_names(self) -> list[str]:
        from openpto.api import load_methods
        from openpto.config import registered_config_types
        from openpto.core.quant import QuantConfig
        from openpto.registry import TRANSFORMS

        load_methods()
        return sorted(name for name, cls in registered_config_types().items()
                      if issubclass(cls, QuantConfig) and cls in TRANSFORMS)

    def availability(self) -> tuple[bool, str]:
        return True, f"torch {torch.__version__}: RTN, GPTQ and AWQ, packed int4/int8 kernels"

    def needs_calibration(self, config: QuantConfig) -> bool:
        return config.needs_calibration

    def planned_size(self, loaded: LoadedModel, config: QuantConfig,
                     metadata: dict[str, Any], *, float_dtype: str = "bfloat16") -> int:
        model = loaded.model
        return planned_size(
            model, loaded.tokenizer, weight_plans(model, config),
            scale_dtype_for(loaded.dtype), metadata, float_dtype=float_dtype,
        )

    def quantize(self, job: QuantizeJob) -> BackendOutput:
        from openpto.api import quantize_

        model = job.loaded.model
        started, cpu_started = time.perf_counter(), time.process_time()
        result = quantize_(model, job.config, job.calibration, device=job.device,
                           on_layer=job.on_layer)
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        write_started, write_cpu = time.perf_counter(), time.process_time()
        # The model keeps computing with exactly what the artifact holds (scales and every
        # float tensor rounded to their storage dtypes), so an evaluation after quantization
        # measures the artifact.
        stored = round_to_stored(model, result.quantized_weights(), job.float_dtype)
        metadata = {**job.metadata, "method_config": job.config.to_dict()}
        info = write_artifact(model, job.loaded.tokenizer, job.output, stored, metadata,
                              float_dtype=job.float_dtype)
        return BackendOutput(
            format=info.format,
            seconds=seconds,
            model=model,
            layer_errors=[r.error for r in result.reports if r.quantized is not None],
            details={"tensor_bytes": info.tensor_bytes, "device": result.device,
                     "quantized_linears": len(stored),
                     # calibration + quantization, then storing the codes and writing the folder
                     "cpu_seconds": cpu_seconds,
                     "write_seconds": time.perf_counter() - write_started,
                     "write_cpu_seconds": time.process_time() - write_cpu},
        )
