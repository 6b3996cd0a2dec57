"""Pure tensor primitives: group-wise affine/symmetric quantization and bit packing.

Conventions used everywhere in ``openpto``:

- codes are unsigned integers in ``[0, 2**bits - 1]`` (stored as ``uint8``);
- a weight ``[out, in]`` is split along ``in`` into groups of ``group_size`` consecutive columns,
  each with one float ``scale`` and one ``zero`` (in the integer domain) per output row;
- ``w ~= (q - zero) * scale``. Symmetric quantization is the special case ``zero = 2**(bits-1)``.

The packers produce the bit layouts that consumers expect: two int4 codes per byte (even column in
the low nibble, so that the bytes viewed as little-endian int32 equal compressed-tensors'
``pack-quantized`` words), int8 as signed bytes, and compressed-tensors' dense int32 packing.
"""

from __future__ import annotations

import math

import torch

from openpto.errors import ConfigError

#: group sizes that the kernels and artifact formats accept (``None`` means one group per row)
GROUP_SIZES = (32, 64, 128)


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"bits must be an integer from 2 to 8, got {bits!r}")


def resolve_group_size(in_features: int, group_size: int | str | None) -> int:
    """The effective group size for a Linear of width ``in_features`` (``None`` -> per channel).

    A group size that does not divide the width is refused with the sizes that would work, since
    formats that need whole groups (compressed-tensors, the int4 kernels) cannot store a ragged one.
    ``"auto"`` (a config's "choose for the model") must have been resolved before this point.
    """
    if group_size is None:
        return in_features
    if isinstance(group_size, str):
        raise ConfigError(
            f"group size {group_size!r} must be resolved to 32, 64, 128 or None before "
            "quantizing (the quantize workflow resolves 'auto' against the model's widths)"
        )
    if group_size <= 0 or in_features % group_size != 0:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        allowed = (
            ", ".join(str(g) for g in fits)
            if fits
            else "none of " + ", ".join(str(g) for g in GROUP_SIZES)
        )
        raise ConfigError(
            f"group size {group_size} does not divide the input width {in_features}; "
            f"group sizes that do: {allowed} (or per-channel)"
        )
    return group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.reshape(rows, cols // group_size, group_size)


def compute_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max ``(scale, zero)`` per row and group, each ``float32 [out, in // group_size]``.

    ``clip`` shrinks the range (a ratio in (0, 1], scalar or ``[out, groups]``), as AWQ's clipping
    search does. The asymmetric range always contains 0, so exact zeros stay exact.
    """
    maxq = 2**bits - 1
    g = _grouped(w.float(), group_size)
    if symmetric:
        absmax = g.abs().amax(dim=-1)
        if clip is not None:
            absmax = absmax * clip
        # (2**bits - 1) / 2 steps on each side of zero: the full code range is used, and the
        # single code left over (2**bits - 1 vs -2**(bits-1)) goes to the negative side.
        scale = absmax / (maxq / 2)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
        return scale, zero
    lo = g.amin(dim=-1).clamp(max=0)
    hi = g.amax(dim=-1).clamp(min=0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = (hi - lo) / maxq
    # An all-zero group: any positive scale reproduces it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """``clamp(round(w / scale) + zero)`` as ``uint8 [out, in]``."""
    maxq = 2**bits - 1
    g = _grouped(w.float(), group_size)
    q = torch.round(g / scale.unsqueeze(-1)) + zero.unsqueeze(-1)
    return q.clamp(0, maxq).to(torch.uint8).reshape(w.shape)


def dequantize_codes(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero) * scale`` per group, computed in float32 (or float64) then cast to ``dtype``."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    g = _grouped(q.to(compute), group_size)
    w = (g - zero.to(compute).unsqueeze(-1)) * scale.to(compute).unsqueeze(-1)
    return w.reshape(q.shape).to(dtype)


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    clip: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Quantize and dequantize in one go (float32), for error estimates inside searches."""
    scale, zero = compute_qparams(w, bits, group_size, symmetric, clip)
    q = quantize_codes(w, scale, zero, bits, group_size)
    return dequantize_codes(q, scale, zero, group_size)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB, computed in float64."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(signal / noise))


# ---------------------------------------------------------------------------------------------
# Packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim: column ``2i`` low nibble, ``2i+1`` high."""
    if q.shape[-1] % 2:
        raise ConfigError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low = packed & 0xF
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 8-bit codes as signed bytes (``q - 128``), the layout int8 matmul kernels read."""
    return (q.to(torch.int16) - 128).to(torch.int8)


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    return (packed.to(torch.int16) + 128).to(torch.uint8)


def pack_int32(q: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    """Dense int32 packing of compressed-tensors' ``pack-quantized`` format.

    Element ``i`` of a row occupies bits ``[i*bits, (i+1)*bits)`` of the row's bit stream, least
    significant first, with no padding between elements (a 3-bit code may straddle two words);
    rows are padded with zero codes to a multiple of 32 elements. The codes are written as they
    are: compressed-tensors stores signed values offset by ``2**(bits-1)``, which is exactly our
    unsigned code, so its ``unpack_from_int32`` returns ``q - 2**(bits-1)``.
    """
    check_bits(bits)
    if q.dim() != 2:
        raise ConfigError(f"pack_int32 expects a 2-D tensor, got shape {tuple(q.shape)}")
    values = q.to(torch.int64)
    if packed_dim == 0:
        values = values.t()
    rows, cols = values.shape
    padded = math.ceil(cols / 32) * 32
    values = torch.nn.functional.pad(values, (0, padded - cols)).reshape(rows, padded // 32, 32)
    # 32 elements of ``bits`` bits fill exactly ``bits`` words: build each chunk's 32*bits-bit
    # stream as int64 partial words, then split it into the 32-bit words.
    starts = torch.arange(32, device=q.device) * bits
    word = starts // 32
    offset = starts % 32
    words = torch.zeros(rows, padded // 32, bits, dtype=torch.int64, device=q.device)
    words.scatter_add_(-1, word.expand(rows, padded // 32, 32), values << offset)
    spill = offset + bits > 32
    if bool(spill.any()):
        high = values[..., spill] >> (32 - offset[spill])
        words.scatter_add_(-1, (word[spill] + 1).expand(rows, padded // 32, -1), high)
    words = words & 0xFFFFFFFF
    # Reinterpret unsigned 32-bit values as int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words)
    out = words.reshape(rows, -1)[:, : math.ceil(cols * bits / 32)].to(torch.int32)
    return out.t().contiguous() if packed_dim == 0 else out.contiguous()


def unpack_int32(
    packed: torch.Tensor, bits: int, shape: tuple[int, int], packed_dim: int = 1
) -> torch.Tensor:
    """Inverse of ``pack_int32``: unsigned codes ``uint8`` of the original ``shape``."""
    check_bits(bits)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if packed_dim == 0:
        words = words.t()
    rows = words.shape[0]
    cols = shape[packed_dim]
    chunks = math.ceil(cols / 32)
    words = torch.nn.functional.pad(words, (0, chunks * bits - words.shape[1]))
    words = words.reshape(rows, chunks, bits)
    starts = torch.arange(32, device=packed.device) * bits
    word = starts // 32
    offset = starts % 32
    mask = (1 << bits) - 1
    values = words[..., word] >> offset
    spill = offset + bits > 32
    if bool(spill.any()):
        nxt = words[..., word[spill] + 1] << (32 - offset[spill])
        values[..., spill] = values[..., spill] | nxt
    values = (values & mask).reshape(rows, chunks * 32)[:, :cols].to(torch.uint8)
    return values.t().contiguous() if packed_dim == 0 else values.contiguous()
