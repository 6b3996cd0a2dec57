"""The quantization backends (``opt quantize --backend``) and the generation backends
(``opt serve --backend``, ``opt generate --backend``)."""

from __future__ import annotations

from typing import Any

from openpto.hookspecs import hookimpl

_QUANT = "openpto.pipeline.backends"
_ENGINES = "openpto.engines"


@hookimpl
def register_quantization_backends(register: Any) -> None:
    register("torch", f"{_QUANT}.torch_backend:TorchBackend")
    register("bitsandbytes", f"{_QUANT}.bnb:BitsAndBytesBackend")
    register("quanto", f"{_QUANT}.quanto:QuantoBackend")
    register("mlx", f"{_QUANT}.mlx:MLXBackend")


@hookimpl
def register_generation_backends(register: Any) -> None:
    register("torch", f"{_ENGINES}.torch_backend:TorchEngine")
    register("llamacpp", f"{_ENGINES}.llamacpp_backend:LlamaCppEngine")
    register("mlx", f"{_ENGINES}.mlx_backend:MLXEngine")
