"""Weight-only quantization: primitives, ``QuantizedWeight``, and the RTN/GPTQ/AWQ transforms.

Importing this package registers each method's transform in ``openpto.registry.TRANSFORMS``.
"""

from __future__ import annotations

from openpto.core.quant import awq, gptq_calibration, rtn  # noqa: F401  (registers the transforms)
from openpto.core.quant.configs import (
    AWQConfig,
    GPTQConfig,
    LLMInt8Config,
    NF4Config,
    QuantConfig,
    RTNConfig,
)
from openpto.core.quant.tensor import QuantizedWeight, quantize_weight

__all__ = [
    "AWQConfig",
    "GPTQConfig",
    "LLMInt8Config",
    "NF4Config",
    "QuantConfig",
    "QuantizedWeight",
    "RTNConfig",
    "quantize_weight",
]
