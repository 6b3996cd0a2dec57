"""Kernels built on torch's own weight-only ops, plus the dequantize-then-matmul reference.

Converting our ``w = (q - zero) * scale`` to the int4 ops' convention ``w = (q - 8) * s + z``
is exact in real arithmetic: ``s = scale`` and ``z = (8 - zero) * scale``. The int8 op has one
scale per row and no zero: it reads signed ``q - zero`` directly when codes have at most 7 bits;
8-bit asymmetric codes are stored as ``q - 128`` and a row offset ``(128 - zero) * scale`` times
``sum(x)`` is added back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from openpto.core.quant.primitives import pack_int4, unpack_int4
from openpto.kernels.base import Kernel

if TYPE_CHECKING:
    from openpto.core.quant.tensor import QuantizedWeight
    from openpto.kernels.quant_linear import QuantLinear

INT4_GROUP_SIZES = (32, 64, 128, 256)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# torch's CPU int4/int8 weight-only kernels are vectorised for bfloat16 activations only: on this
# 2-core AVX-512 machine a 576x1536 layer took 165 us (int4) / 170 us (int8) per token in
# bfloat16 against 4.4 ms / 2.5 ms in float32 and 5.3 ms / 3.1 ms in float16. The CPU kernels
# therefore always compute in bfloat16 (scales too) and cast the output back to the input dtype.
CPU_COMPUTE = torch.bfloat16


def _int4_scales_and_zeros(qw: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    scale = qw.scale.double()
    offset = (8.0 - qw.zero.double()) * scale
    # [out, groups, 2] -> [groups, out, 2], the layout both int4 ops read.
    return torch.stack([scale, offset], dim=-1).transpose(0, 1).contiguous().to(dtype)


def _int4_reason(qw: QuantizedWeight) -> str | None:
    if qw.bits > 4:
        return f"needs at most 4 bits, got {qw.bits}"
    if qw.group_size not in INT4_GROUP_SIZES:
        return f"needs group size 32, 64, 128 or 256, got {qw.group_size}"
    return None


class ReferenceKernel(Kernel):
    """Dequantize the codes on every call, then a dense matmul: correct everywhere, never fast."""

    name = "dequantized-reference"
    priority = 0

    @classmethod
    def unavailable(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> str | None:
        return None

    @classmethod
    def pack(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        codes = pack_int4(qw.q) if qw.bits <= 4 and qw.in_features % 2 == 0 else qw.q
        return {"codes": codes.to(device), "scale": qw.scale.to(device), "zero": qw.zero.to(device)}

    @classmethod
    def matmul(cls, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        codes = module.get_buffer("codes")
        if codes.shape[1] != module.in_features:
            codes = unpack_int4(codes)
        rows = module.out_features
        g = codes.float().reshape(rows, -1, module.group_size)
        w = (g - module.get_buffer("zero").unsqueeze(-1)) * module.get_buffer("scale").unsqueeze(-1)
        return F.linear(x, w.reshape(rows, -1).to(x.dtype))


class Int4CPUKernel(Kernel):
    """``aten._weight_int4pack_mm_for_cpu``: int4 codes in torch's CPU tile layout, computing
    in bfloat16 whatever the model dtype (see ``CPU_COMPUTE``)."""

    name = "packed-int4-cpu"
    priority = 20

    @classmethod
    def unavailable(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> str | None:
        if device.type != "cpu":
            return "CPU only"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
        if qw.out_features % 16:
            return f"needs out_features divisible by 16, got {qw.out_features}"
        if dtype not in FLOAT_DTYPES:
            return f"activations must be float32, bfloat16 or float16, got {dtype}"
        return _int4_reason(qw)

    @classmethod
    def pack(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.q.to(torch.int32), 1)
        return {"packed": packed, "scales_and_zeros": _int4_scales_and_zeros(qw, CPU_COMPUTE)}

    @classmethod
    def matmul(cls, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        sz = module.get_buffer("scales_and_zeros")
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(sz.dtype), module.get_buffer("packed"), module.group_size, sz
        )
        return y.to(x.dtype)


class Int8CPUKernel(Kernel):
    """``aten._weight_int8pack_mm``: signed int8 rows with one scale each (per-channel only),
    computing in bfloat16 whatever the model dtype (see ``CPU_COMPUTE``)."""

    name = "packed-int8-cpu"
    priority = 20

    @classmethod
    def unavailable(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> str | None:
        if device.type != "cpu":
            # torch has a CUDA int8 kernel too, but it is naive: far below an H200's bandwidth.
            return "CPU only"
        if not qw.per_channel:
            return f"needs per-channel scales, got group size {qw.group_size}"
        if dtype not in FLOAT_DTYPES:
            return f"activations must be float32, bfloat16 or float16, got {dtype}"
        return None

    @classmethod
    def pack(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        q = qw.q.to(torch.int16)
        # q - zero fits in int8 when codes have at most 7 bits: exact, no correction term.
        shift = qw.zero[:, :1].to(torch.int16) if qw.bits < 8 else torch.full_like(q[:, :1], 128)
        weight = (q - shift).to(torch.int8)
        scale = qw.scale[:, 0].double()
        offset = ((shift[:, 0].double() - qw.zero[:, 0].double()) * scale).float()
        if bool((offset == 0).all()):
            offset = offset[:0]  # symmetric 8-bit and every code of 7 bits or fewer
        return {"weight": weight, "scales": scale.to(CPU_COMPUTE), "offset": offset}

    @classmethod
    def matmul(cls, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        scales, offset = module.get_buffer("scales"), module.get_buffer("offset")
        y = torch.ops.aten._weight_int8pack_mm(
            x.to(scales.dtype), module.get_buffer("weight"), scales
        )
        if offset.numel():
            y = y.float() + x.float().sum(-1, keepdim=True) * offset
        return y.to(x.dtype)


class TinygemmInt4CUDAKernel(Kernel):
    """``aten._weight_int4pack_mm`` (tinygemm): bf16 activations, int4 tiles, sm80+."""

    name = "tinygemm-int4-cuda"
    priority = 20

    @staticmethod
    def inner_k_tiles(in_features: int) -> int | None:
        for tiles in (8, 4, 2):
            if in_features % (tiles * 16) == 0:
                return tiles
        return None

    @classmethod
    def unavailable(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> str | None:
        if device.type != "cuda":
            return "CUDA only"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "needs compute capability 8.0 or newer"
        if qw.out_features % 8:
            return f"needs out_features divisible by 8, got {qw.out_features}"
        if cls.inner_k_tiles(qw.in_features) is None:
            return f"needs in_features divisible by 32, got {qw.in_features}"
        return _int4_reason(qw)

    @classmethod
    def pack(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        q = qw.q.to(device)
        # This op wants the even column in the HIGH nibble (the opposite of pack_int4).
        nibbles = (q[:, 0::2] << 4) | q[:, 1::2]
        tiles = cls.inner_k_tiles(qw.in_features)
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), tiles)
        return {
            "packed": packed,
            "scales_and_zeros": _int4_scales_and_zeros(qw, torch.bfloat16).to(device),
        }

    @classmethod
    def matmul(cls, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        packed, sz = module.get_buffer("packed"), module.get_buffer("scales_and_zeros")
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), packed, module.group_size, sz)
        return y.to(x.dtype)
