"""Weight-only quantization: primitives, ``QuantizedWeight``, and the RTN/GPTQ/AWQ transforms.

The transforms (``rtn``, ``gptq_calibration``, ``awq``) are registered by the built-in plugin
``openpto.default_plugins.methods`` and imported only when a method runs.
"""

from __future__ import annotations

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
