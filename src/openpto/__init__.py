"""openpto: make open language models smaller and faster after training, and prove it.

The public API, which every front end calls::

    import openpto

    result = openpto.quantize("smollm2-135m", openpto.GPTQConfig(bits=4, group_size=64),
                              openpto.QuantizeOptions(evaluation=openpto.EvalOptions()))
    print(result.to_dict())

Each workflow takes a model spec (an alias, folder, ``.gguf`` file, artifact or cached hub id,
or a loaded model) and frozen config objects, and returns a result dataclass; ``progress=``
receives its progress (silent without it). ``openpto.configs()`` lists every registered method
config with its fields. Importing this package is cheap: the names are resolved on first use
(PEP 562), so ``import openpto`` pulls in no torch, fastapi, textual or typer and never
initialises CUDA.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> "module:attribute", imported on first access
_LAZY = {
    "load_model": "openpto.models:load_model",
    "evaluate": "openpto.pipeline.evaluate:evaluate",
    "EvalConfig": "openpto.pipeline.evaluate:EvalConfig",
    "EvalResult": "openpto.pipeline.evaluate:EvalResult",
    "quantize": "openpto.pipeline.quantize:quantize",
    "QuantizeResult": "openpto.pipeline.quantize:QuantizeResult",
    "sparsify": "openpto.pipeline.sparsify:sparsify",
    "SparsifyResult": "openpto.pipeline.sparsify:SparsifyResult",
    "export": "openpto.pipeline.export:export",
    "ExportConfig": "openpto.pipeline.export:ExportConfig",
    "ExportResult": "openpto.pipeline.export:ExportResult",
    "generate": "openpto.pipeline.generate:generate",
    "GenerationConfig": "openpto.pipeline.generate:GenerationConfig",
    "GenerateResult": "openpto.pipeline.generate:GenerateResult",
    "speculative": "openpto.pipeline.generate:speculative",
    "SpeculativeConfig": "openpto.pipeline.generate:SpeculativeConfig",
    "SpeculativeResult": "openpto.pipeline.generate:SpeculativeResult",
    "profile": "openpto.pipeline.profile:profile",
    "ProfileConfig": "openpto.pipeline.profile:ProfileConfig",
    "ProfileResult": "openpto.profiling:ProfileResult",
    "bench": "openpto.pipeline.profile:bench",
    "BenchResult": "openpto.pipeline.profile:BenchResult",
    "configs": "openpto.api:configs",
    "CalibrationOptions": "openpto.pipeline.workflow:CalibrationOptions",
    "EvalOptions": "openpto.pipeline.workflow:EvalOptions",
    "QuantizeOptions": "openpto.pipeline.workflow:QuantizeOptions",
    "SparsifyOptions": "openpto.pipeline.workflow:SparsifyOptions",
    "MethodConfig": "openpto.config:MethodConfig",
    "config_from_dict": "openpto.config:config_from_dict",
    # marks a plugin's hook functions (openpto.hookspecs, docs/plugins.md)
    "hookimpl": "openpto.hookspecs:hookimpl",
    # the registered method configs
    "QuantConfig": "openpto.core.quant:QuantConfig",
    "RTNConfig": "openpto.core.quant:RTNConfig",
    "GPTQConfig": "openpto.core.quant:GPTQConfig",
    "AWQConfig": "openpto.core.quant:AWQConfig",
    "NF4Config": "openpto.core.quant:NF4Config",
    "LLMInt8Config": "openpto.core.quant:LLMInt8Config",
    "SparsityConfig": "openpto.core.sparsity:SparsityConfig",
    "MagnitudeConfig": "openpto.core.sparsity:MagnitudeConfig",
    "WandaConfig": "openpto.core.sparsity:WandaConfig",
    "SparseGPTConfig": "openpto.core.sparsity:SparseGPTConfig",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'openpto' has no attribute {name!r}")
    module_name, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
