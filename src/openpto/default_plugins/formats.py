"""The artifact formats ``load_model`` reads (by ``openpto.json``'s ``format``) and the formats
``opt export`` writes."""

from __future__ import annotations

from typing import Any

from openpto.hookspecs import hookimpl

_LOADERS = "openpto.models.artifact_loaders"
_EXPORT = "openpto.pipeline.export"


@hookimpl
def register_artifact_loaders(register: Any) -> None:
    register("pack-quantized", f"{_LOADERS}:load_pack_quantized")
    register("sparse-bitmask", f"{_LOADERS}:load_sparse")
    register("sparse-24-bitmask", f"{_LOADERS}:load_sparse")
    register("bitsandbytes", f"{_LOADERS}:load_bitsandbytes")
    register("quanto", f"{_LOADERS}:load_quanto")
    register("mlx", f"{_LOADERS}:load_mlx")


@hookimpl
def register_exporters(register: Any) -> None:
    register("gguf", f"{_EXPORT}:write_gguf")
    register("compressed-tensors", f"{_EXPORT}:write_compressed_tensors")
    register("mlx", f"{_EXPORT}:write_mlx")
