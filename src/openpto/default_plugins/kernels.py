"""The packed-Linear kernels: the dequantized reference, torch's CPU/CUDA int4/int8 ops,
cuSPARSELt 2:4 and the Triton W4A16 kernels. ``kernel="auto"`` takes the available one with the
highest priority, so a faster kernel needs only a line here (or a plugin of its own)."""

from __future__ import annotations

from typing import Any

from openpto.hookspecs import hookimpl

_OPS = "openpto.kernels.torch_ops"
_TRITON = "openpto.kernels.triton.linear"


@hookimpl
def register_kernels(register: Any) -> None:
    register("dequantized-reference", f"{_OPS}:ReferenceKernel")
    register("packed-int4-cpu", f"{_OPS}:Int4CPUKernel")
    register("packed-int8-cpu", f"{_OPS}:Int8CPUKernel")
    register("tinygemm-int4-cuda", f"{_OPS}:TinygemmInt4CUDAKernel")
    register("sparse24-cusparselt", "openpto.kernels.sparse24:Sparse24Kernel")
    register("triton-w4a16", f"{_TRITON}:TritonW4A16Kernel")
    register("triton-w4a16-2:4", f"{_TRITON}:TritonSparse24Int4Kernel")
