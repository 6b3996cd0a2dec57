"""The quantization (RTN, GPTQ, AWQ) and pruning (magnitude, Wanda, SparseGPT) methods."""

from __future__ import annotations

from typing import Any

from openpto.hookspecs import hookimpl

_QUANT = "openpto.core.quant"
_SPARSITY = "openpto.core.sparsity"


@hookimpl
def register_methods(register: Any) -> None:
    register(f"{_QUANT}.configs:RTNConfig", f"{_QUANT}.rtn:rtn_transform")
    register(f"{_QUANT}.configs:GPTQConfig", f"{_QUANT}.gptq_calibration:gptq_transform")
    register(f"{_QUANT}.configs:AWQConfig", f"{_QUANT}.awq:awq_transform")
    for config in ("MagnitudeConfig", "WandaConfig", "SparseGPTConfig"):
        register(f"{_SPARSITY}.configs:{config}", f"{_SPARSITY}.transforms:sparsify_model")
