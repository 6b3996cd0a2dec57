"""Packed Linear modules and the kernels that run them.

Kernels register by name in ``openpto.registry.KERNELS`` (lazily, as ``"module:Class"``), each a
``openpto.kernels.base.Kernel``. ``QuantLinear(..., kernel="auto")`` takes the available one with
the highest priority, so a new kernel only needs a ``KERNELS.register`` line below.
"""

from __future__ import annotations

from openpto.registry import KERNELS

KERNELS.register("dequantized-reference", "openpto.kernels.torch_ops:ReferenceKernel")
KERNELS.register("packed-int4-cpu", "openpto.kernels.torch_ops:Int4CPUKernel")
KERNELS.register("packed-int8-cpu", "openpto.kernels.torch_ops:Int8CPUKernel")
KERNELS.register("tinygemm-int4-cuda", "openpto.kernels.torch_ops:TinygemmInt4CUDAKernel")
KERNELS.register("sparse24-cusparselt", "openpto.kernels.sparse24:Sparse24Kernel")
KERNELS.register("triton-w4a16", "openpto.kernels.triton.linear:TritonW4A16Kernel")
KERNELS.register("triton-w4a16-2:4", "openpto.kernels.triton.linear:TritonSparse24Int4Kernel")

from openpto.kernels.quant_linear import QuantLinear, model_kernel_summary, swap_to_packed  # noqa: E402

__all__ = ["QuantLinear", "model_kernel_summary", "swap_to_packed"]
