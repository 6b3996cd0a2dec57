"""``QuantizedWeight``: the integer codes of one Linear plus its group-wise scales and zeros.

Every method (RTN, GPTQ, AWQ) produces one of these per Linear, in the Linear's original column
order; the packed runtime (``openpto.kernels``) and the artifact writers consume it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openpto.core.quant.primitives import (
    check_bits,
    compute_qparams,
    dequantize_codes,
    quantize_codes,
    resolve_group_size,
)
from openpto.errors import ConfigError


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    q: torch.Tensor  # uint8 [out, in], codes in [0, 2**bits - 1]
    scale: torch.Tensor  # float32 [out, in // group_size]
    zero: torch.Tensor  # float32 [out, in // group_size], integer-valued zero-point
    bits: int
    group_size: int  # in_features when per-channel
    symmetric: bool

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.q.dtype != torch.uint8 or self.q.dim() != 2:
            raise ConfigError(
                f"codes must be a 2-D uint8 tensor, got {self.q.dtype} {tuple(self.q.shape)}"
            )
        out, width = self.q.shape
        resolve_group_size(width, self.group_size)
        groups = (out, width // self.group_size)
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if tuple(t.shape) != groups:
                raise ConfigError(f"{name} must have shape {groups}, got {tuple(t.shape)}")

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.q.shape[1])

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.in_features

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.q, self.scale, self.zero, self.group_size, dtype)

    def packed_nbytes(self, scale_bytes: int = 2) -> int:
        """Bytes once packed: ``bits`` per code, plus per group a scale of ``scale_bytes`` and,
        when asymmetric, a zero-point of ``bits``."""
        codes = (self.q.numel() * self.bits + 7) // 8
        zeros = 0 if self.symmetric else (self.zero.numel() * self.bits + 7) // 8
        return codes + zeros + self.scale.numel() * scale_bytes

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.q.to(device),
            self.scale.to(device),
            self.zero.to(device),
            self.bits,
            self.group_size,
            self.symmetric,
        )


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int | str | None, symmetric: bool
) -> QuantizedWeight:
    """Round-to-nearest with min/max scales: the baseline every other method is compared with."""
    check_bits(bits)
    g = resolve_group_size(w.shape[1], group_size)
    scale, zero = compute_qparams(w, bits, g, symmetric)
    q = quantize_codes(w, scale, zero, bits, g)
    return QuantizedWeight(q, scale, zero, bits, g, symmetric)
