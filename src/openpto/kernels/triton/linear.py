"""The Triton kernels as ``openpto.kernels.base.Kernel`` classes, plus a 2:4 bf16 Linear.

Nothing here imports triton until a matmul runs, so ``unavailable`` can say why a kernel cannot
run (no CUDA, no triton, an unsupported shape) on any machine.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from openpto.errors import BackendUnavailable, MissingDependency
from openpto.kernels import gpu_dispatch as gd
from openpto.kernels.base import Kernel
from openpto.kernels.triton import tuned

if TYPE_CHECKING:
    from openpto.core.quant.tensor import QuantizedWeight
    from openpto.kernels.quant_linear import QuantLinear

ACT_DTYPES = (torch.bfloat16, torch.float16)
#: above this many tokens the 2:4 kernels expand the weight and call cuBLAS (measured on an H200:
#: the compressed kernels lose to expand + cuBLAS from 2 tokens on; docs/benchmarks.md)
SPARSE_MAX_TOKENS = 1


@functools.cache
def _module(name: str) -> ModuleType:
    if importlib.util.find_spec("triton") is None:
        raise MissingDependency("triton", "gpu", "the Triton GPU kernels")
    return importlib.import_module(f"openpto.kernels.triton.{name}")


def device_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot run on ``device`` with ``dtype`` activations, or ``None``."""
    if device.type != "cuda":
        return "CUDA only"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "needs compute capability 8.0 or newer"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'openpto[gpu]')"
    if dtype not in ACT_DTYPES:
        return f"activations must be bfloat16 or float16, got {dtype}"
    return None


def _shape_reason(qw: QuantizedWeight) -> str | None:
    if qw.bits > 4:
        return f"needs at most 4 bits, got {qw.bits}"
    if qw.in_features % gd.KBLOCK or qw.group_size % gd.KBLOCK:
        return (
            f"needs in_features and group size divisible by 128, got {qw.in_features} and "
            f"{qw.group_size}"
        )
    if qw.out_features % 8:
        return f"needs out_features divisible by 8, got {qw.out_features}"
    if not torch.equal(qw.zero, qw.zero.round()):
        return "needs integer zero-points"
    return None


def _act(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class TritonW4A16Kernel(Kernel):
    """Int4 weights, bf16/fp16 activations: Triton split-K GEMV for decode, tensor-core tiles for
    a few dozen tokens, and dequantize + cuBLAS for prefill (``gpu_dispatch.choose_w4a16``)."""

    name = "triton-w4a16"
    priority = 30

    @classmethod
    def unavailable(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> str | None:
        return device_reason(device, dtype) or _shape_reason(qw)

    @classmethod
    def pack(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        packed = gd.pack_w4a16(qw.q, qw.scale, qw.zero, qw.group_size)
        return {k: v.to(device) for k, v in packed.items()}

    @classmethod
    def matmul(cls, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        qweight, sz = module.get_buffer("qweight"), module.get_buffer("sz")
        launch = gd.choose_w4a16(x.shape[0], module.out_features, module.in_features, tuned.W4A16)
        y = _module("w4a16").w4a16_matmul(
            _act(x, module.dtype), qweight, sz, module.group_size, launch
        )
        return _act(y, x.dtype)


def is_24_int4(qw: QuantizedWeight) -> bool:
    """True when at most 2 of every 4 consecutive codes differ from their zero-point (the codes
    of a 2:4-pruned weight, whose pruned entries dequantize to exactly 0)."""
    if qw.in_features % 4 or qw.group_size % 4:
        return False
    grouped = qw.q.reshape(qw.out_features, -1, qw.group_size)
    nonzero = grouped != qw.zero.to(torch.uint8).unsqueeze(-1)
    return bool((nonzero.reshape(qw.out_features, -1, 4).sum(-1) <= 2).all())


class TritonSparse24Int4Kernel(Kernel):
    """2:4-pruned int4 weights stored compressed (kept codes and 2-bit positions only): 3.25 bits
    per weight with the scales, instead of 4.25. Not chosen by ``"auto"`` (its priority is below the
    dense W4A16 kernel's): on an H200 it is smaller but runs at 0.64-0.80x that kernel's speed at
    1 token; ask for it by name."""

    name = "triton-w4a16-2:4"
    priority = 25

    @classmethod
    def unavailable(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> str | None:
        reason = device_reason(device, dtype) or _shape_reason(qw)
        if reason is None and not is_24_int4(qw):
            reason = "the weight is not 2:4 sparse"
        return reason

    @classmethod
    def pack(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        packed = gd.compress_24_int4(qw.q, qw.scale, qw.zero, qw.group_size)
        return {k: v.to(device) for k, v in packed.items()}

    @classmethod
    def matmul(cls, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        values, meta, sz = (module.get_buffer(n) for n in ("values", "meta", "sz"))
        xa = _act(x, module.dtype)
        sp = _module("sparse24")
        if x.shape[0] > SPARSE_MAX_TOKENS:
            y = xa @ sp.expand24(values, meta, xa.dtype, sz, module.group_size)
        else:
            launch = gd.choose_24(
                x.shape[0], module.out_features, module.in_features, "int4", tuned.SPARSE24
            )
            y = sp.sparse24_matmul(xa, values, meta, launch, sz, module.group_size)
        return _act(y, x.dtype)


class Compressed24Linear(nn.Module):
    """A bf16/fp16 Linear whose 2:4-sparse weight is stored compressed (kept values + positions).

    Up to ``SPARSE_MAX_TOKENS`` tokens run the Triton matrix-vector kernel, which reads 9/16 of the
    dense weight's bytes; more tokens expand the weight and use cuBLAS. It saves memory, not time:
    docs/benchmarks.md has the measured speed.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        reason = device_reason(weight.device, weight.dtype)
        if reason is not None:
            raise BackendUnavailable(f"Compressed24Linear cannot run here: {reason}")
        self.out_features, self.in_features = weight.shape
        if self.in_features % gd.KBLOCK:
            raise BackendUnavailable(
                f"Compressed24Linear needs in_features divisible by 128, got {self.in_features}"
            )
        self.dtype = weight.dtype
        for name, t in gd.compress_24(weight.detach(), mask).items():
            self.register_buffer(name, t)
        self.bias: torch.Tensor | None
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Compressed24Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = _act(x.reshape(-1, self.in_features), self.dtype)
        values, meta = self.get_buffer("values"), self.get_buffer("meta")
        sp = _module("sparse24")
        if x2.shape[0] > SPARSE_MAX_TOKENS:
            y = x2 @ sp.expand24(values, meta, self.dtype)
        else:
            launch = gd.choose_24(
                x2.shape[0], self.out_features, self.in_features, "bf16", tuned.SPARSE24
            )
            y = sp.sparse24_matmul(x2, values, meta, launch)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return _act(y, x.dtype).reshape(*shape[:-1], self.out_features)


def dense_reference(module: nn.Module) -> torch.Tensor:
    """The float32 ``[out, in]`` weight a Triton-backed module computes with (for checks)."""
    if isinstance(module, Compressed24Linear):
        return gd.decompress_24(module.get_buffer("values"), module.get_buffer("meta")).float()
    names = dict(module.named_buffers())
    if "qweight" in names:
        return gd.dequantize_w4a16(names["qweight"], names["sz"])
    if "values" in names and "sz" in names:
        return gd.dequantize_24_int4(names["values"], names["meta"], names["sz"])
    raise BackendUnavailable(f"{type(module).__name__} has no Triton-packed weight")


__all__ = [
    "Compressed24Linear",
    "TritonSparse24Int4Kernel",
    "TritonW4A16Kernel",
    "dense_reference",
    "device_reason",
    "is_24_int4",
]
