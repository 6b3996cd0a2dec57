"""Weight layouts and launch choices for the Triton GPU kernels, importable without triton or CUDA.

Everything here is plain torch on any device: the load-time repacks that the kernels read, their
exact inverses (for tests and for dequantizing), and the choice of kernel and launch shape for a
given token count. The kernels themselves live in ``openpto.kernels.triton``.

Layouts (``K`` = in_features, ``N`` = out_features, a *kblock* is 128 consecutive input columns):

**W4A16** (``pack_w4a16``): ``qweight int32 [K/8, N]``: word ``(16*b + r, n)``, bits ``4j..4j+3``,
holds code ``q[n, 128*b + 16*j + r]``. Words run along N, so a program that owns a strip of
outputs reads whole 16-byte vectors and reduces over K inside each thread; the interleave inside a
kblock makes nibble ``j`` of a 16-row tile the contiguous columns ``16j..16j+15``, so the matching
activations load as one vector and the same tile feeds ``tl.dot`` with K=16 unchanged.
``sz int32 [K/g, N]``: the group's bf16 scale in the low half and its bf16 zero-point (an integer,
exact in bf16) in the high half, so one load brings both.

**2:4** (``compress_24``): every 4 consecutive input columns keep 2, at positions ``p0 < p1``.
``meta int32 [K/32, N]``: word ``(R, n)``, nibble ``j`` describes group ``t = 8R + j`` (columns
``4t..4t+3``): bits 0-1 are ``p0`` and bits 2-3 are ``p1``. Kept values are either bf16 pairs,
``values int32 [K/4, N]`` with word ``(t, n)`` = ``v0`` in the low half and ``v1`` in the high half,
or int4 codes, ``values int32 [K/16, N]`` with word ``(V, n)`` holding groups ``4V..4V+3`` as
nibbles ``2*(t - 4V) + i``; int4 values share the W4A16 ``sz`` words.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openpto.errors import ConfigError

KBLOCK = 128  # input columns per kblock: 16 int32 words of 8 nibbles
#: token counts the tuned tables are keyed by; a count rounds up to the next bucket
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: multiprocessors of the GPU the default launch shapes were sized for (H200)
DEFAULT_SMS = 132


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _u32(words: torch.Tensor) -> torch.Tensor:
    """int32 -> int64 holding the same 32 bits as an unsigned value."""
    return words.to(torch.int64) & 0xFFFFFFFF


def _check_w4a16_shape(q: torch.Tensor, group_size: int) -> None:
    k = q.shape[1]
    if k % KBLOCK:
        raise ConfigError(f"the Triton int4 layout needs in_features divisible by 128, got {k}")
    if group_size % KBLOCK or k % group_size:
        raise ConfigError(
            f"the Triton int4 layout needs a group size that is a multiple of 128 and divides "
            f"{k}, got {group_size}"
        )


# --- W4A16 ------------------------------------------------------------------------------------


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` in [0, 15] -> ``qweight int32 [K/8, N]`` (module docstring)."""
    n, k = q.shape
    if k % KBLOCK:
        raise ConfigError(f"in_features must be divisible by 128, got {k}")
    if q.numel() and int(q.max()) > 15:
        raise ConfigError("int4 packing needs codes in [0, 15]")
    # [n, b, j, r] -> [b, r, n, j]
    v = q.to(torch.int64).reshape(n, k // KBLOCK, 8, 16).permute(1, 3, 0, 2)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (v << shifts).sum(dim=-1)
    return _to_int32(words.reshape(k // 8, n)).contiguous()


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``pack_codes``: ``int32 [K/8, N]`` -> uint8 ``[N, K]``."""
    kw, n = qweight.shape
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int64)
    nib = (_u32(qweight).reshape(kw // 16, 16, n, 1) >> shifts) & 0xF  # [b, r, n, j]
    return nib.permute(2, 0, 3, 1).reshape(n, kw * 8).to(torch.uint8).contiguous()


def pack_scale_zero(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale, zero float [N, G]`` -> ``sz int32 [G, N]``: bf16 scale low, bf16 zero high."""
    s = scale.t().to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    z = zero.t().to(torch.bfloat16).contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    return _to_int32(s | (z << 16)).contiguous()


def unpack_scale_zero(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sz int32 [G, N]`` -> ``(scale, zero)`` float32 ``[N, G]`` as the kernels see them."""
    words = _u32(sz)
    lo = _to_int32(words << 16).view(torch.float32)
    hi = _to_int32(words & 0xFFFF0000).view(torch.float32)
    return lo.t().contiguous(), hi.t().contiguous()


def pack_w4a16(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> dict[str, torch.Tensor]:
    """A ``QuantizedWeight``'s ``(q, scale, zero)`` -> the buffers the W4A16 kernels read.

    The scale is rounded to bf16 (a relative change of at most 2**-9 per group, below the bf16
    activations' own rounding); integer zero-points in [0, 255] are exact in bf16.
    """
    _check_w4a16_shape(q, group_size)
    if not torch.equal(zero, zero.round()):
        raise ConfigError("the Triton int4 layout needs integer zero-points")
    return {"qweight": pack_codes(q), "sz": pack_scale_zero(scale, zero)}


def dequantize_w4a16(qweight: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, K]`` weight of the packed buffers, exactly as the kernels dequantize it."""
    q = unpack_codes(qweight).float()
    scale, zero = unpack_scale_zero(sz)
    n, k = q.shape
    g = k // scale.shape[1]
    w = (q.reshape(n, -1, g) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    return w.reshape(n, k)


# --- 2:4 --------------------------------------------------------------------------------------


def positions_24(mask: torch.Tensor) -> torch.Tensor:
    """Keep-mask ``[N, K]`` (at most 2 of every 4 True) -> ``int64 [N, K/4, 2]`` positions
    ``p0 < p1``; a group with fewer than 2 kept entries takes its first unkept positions, whose
    stored values are then zeros."""
    n, k = mask.shape
    if k % 32:
        raise ConfigError(f"the 2:4 layout needs in_features divisible by 32, got {k}")
    groups = mask.reshape(n, k // 4, 4)
    if bool((groups.sum(-1) > 2).any()):
        raise ConfigError("the weight is not 2:4 sparse: some group of 4 keeps more than 2")
    pos = torch.arange(4, device=mask.device)
    # kept first, then lower positions: a stable choice, so compress(decompress(x)) == x
    key = groups.to(torch.int64) * 8 - pos
    return torch.topk(key, 2, dim=-1).indices.sort(dim=-1).values


def _pack_meta(p: torch.Tensor) -> torch.Tensor:
    n, groups, _ = p.shape
    nib = (p[..., 0] | (p[..., 1] << 2)).reshape(n, groups // 8, 8)  # [n, R, j]
    shifts = torch.arange(0, 32, 4, device=p.device, dtype=torch.int64)
    return _to_int32((nib << shifts).sum(-1).t()).contiguous()  # [R, n]


def _unpack_meta(meta: torch.Tensor) -> torch.Tensor:
    r, n = meta.shape
    shifts = torch.arange(0, 32, 4, device=meta.device, dtype=torch.int64)
    nib = (_u32(meta).t().reshape(n, r, 1) >> shifts) & 0xF  # [n, R, j]
    nib = nib.reshape(n, r * 8)
    return torch.stack([nib & 3, nib >> 2], dim=-1)


def _kept(weight: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    return torch.gather(weight.reshape(n, k // 4, 4), 2, p)  # [n, groups, 2]


def compress_24(weight: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A 2:4-sparse weight ``[N, K]`` -> bf16 ``values`` and ``meta`` (module docstring).

    ``mask`` defaults to the weight's non-zeros. Kept values are rounded to bf16.
    """
    if mask is None:
        mask = weight != 0
    p = positions_24(mask)
    kept = _kept(weight.to(torch.bfloat16), p)
    kept = torch.where(_kept(mask, p), kept, torch.zeros_like(kept))
    bits = kept.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF  # [n, groups, 2]
    words = bits[..., 0] | (bits[..., 1] << 16)
    return {"values": _to_int32(words.t()).contiguous(), "meta": _pack_meta(p)}


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``compress_24``: the dense bf16 ``[N, K]`` weight."""
    p = _unpack_meta(meta)
    n, groups = p.shape[:2]
    words = _u32(values).t()  # [n, groups]
    lo = _to_int32(words << 16).view(torch.float32)
    hi = _to_int32(words & 0xFFFF0000).view(torch.float32)
    kept = torch.stack([lo, hi], dim=-1)
    dense = torch.zeros(n, groups, 4, dtype=torch.float32, device=values.device)
    dense.scatter_(2, p, kept)
    return dense.reshape(n, groups * 4).to(torch.bfloat16)


def compress_24_int4(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Int4 codes of a 2:4-sparse weight -> int4 ``values``, ``meta`` and ``sz``.

    ``mask`` defaults to the codes that do not dequantize to zero (``q != zero``). Pruned
    positions are not stored, so the kernels treat them as exact zeros.
    """
    _check_w4a16_shape(q, group_size)
    if mask is None:
        zeros = zero.repeat_interleave(group_size, dim=1)
        mask = q.to(zeros.dtype) != zeros
    p = positions_24(mask)
    kept = _kept(q.to(torch.int64), p)
    # a filler position (group with fewer than 2 kept) stores the zero-point: it dequantizes to 0
    z = zero.repeat_interleave(group_size // 4, dim=1).to(torch.int64)
    kept = torch.where(_kept(mask, p), kept, z.unsqueeze(-1))
    n, groups, _ = kept.shape
    nib = kept.reshape(n, groups // 4, 8)  # [n, V, 2*(t-4V)+i]
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int64)
    words = (nib << shifts).sum(-1).t()
    return {
        "values": _to_int32(words).contiguous(),
        "meta": _pack_meta(p),
        "sz": pack_scale_zero(scale, zero),
    }


def decompress_24_int4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``compress_24_int4``'s codes: uint8 ``[N, K]`` with pruned positions set to
    ``255`` (they carry no code)."""
    p = _unpack_meta(meta)
    n, groups = p.shape[:2]
    shifts = torch.arange(0, 32, 4, device=values.device, dtype=torch.int64)
    nib = (_u32(values).t().unsqueeze(-1) >> shifts) & 0xF  # [n, V, 8]
    kept = nib.reshape(n, groups, 2)
    dense = torch.full((n, groups, 4), 255, dtype=torch.int64, device=values.device)
    dense.scatter_(2, p, kept)
    return dense.reshape(n, groups * 4).to(torch.uint8)


def dequantize_24_int4(values: torch.Tensor, meta: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, K]`` weight of compressed int4 2:4 buffers, pruned positions exactly 0."""
    codes = decompress_24_int4(values, meta)
    scale, zero = unpack_scale_zero(sz)
    n, k = codes.shape
    g = k // scale.shape[1]
    q = codes.float().reshape(n, -1, g)
    w = (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    w = torch.where(codes.reshape(n, -1, g) == 255, torch.zeros_like(w), w)
    return w.reshape(n, k)


# --- dispatch ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One kernel choice and its launch shape.

    ``path``: ``gemv`` (CUDA-core dot products, ``block_m`` tokens per pass), ``dot`` (tensor-core
    tiles of ``block_m`` tokens), or ``dequant`` (expand to bf16, then cuBLAS). ``split_k`` splits
    the K/128 kblocks over that many programs per output strip; the last program to finish adds the
    partial sums, so one launch does everything.
    """

    path: str
    block_n: int = 256
    block_m: int = 1
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    rows: int = 16  # gemv: word rows per tile (16 = a whole kblock, 8 = half, 4 = a quarter)
    prefetch: bool = False  # gemv: load the next tile before this tile's arithmetic
    atomic: bool = False  # gemv split-K: add partials atomically (not bit-reproducible)

    def to_dict(self) -> dict[str, int | str | bool]:
        return {
            "path": self.path,
            "block_n": self.block_n,
            "block_m": self.block_m,
            "split_k": self.split_k,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "rows": self.rows,
            "prefetch": self.prefetch,
            "atomic": self.atomic,
        }


def token_bucket(m: int) -> int:
    for b in TOKEN_BUCKETS:
        if m <= b:
            return b
    return TOKEN_BUCKETS[-1]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_split(
    n_blocks: int, kblocks: int, sms: int = DEFAULT_SMS, waves: int = 4, max_split: int = 32
) -> int:
    """The smallest split of the kblocks (a divisor) that gives every multiprocessor ``waves``
    programs, so enough 16-byte loads are in flight to cover memory latency; at most
    ``max_split``, because the last program of a strip loads all partial sums as one tile, whose
    registers (255 per thread for 128 x 1024, measured with ncu on an H200) cap occupancy."""
    divisors = [d for d in _divisors(kblocks) if d <= max_split]
    for d in divisors:
        if n_blocks * d >= waves * sms:
            return d
    return divisors[-1]


def choose_w4a16(
    m: int,
    n: int,
    k: int,
    tuned: dict[tuple[int, int, int], Launch] | None = None,
    sms: int = DEFAULT_SMS,
) -> Launch:
    """The launch for ``x [m, k] @ W^T [k, n]``: a measured entry of ``tuned`` when one exists
    for this shape and token bucket, otherwise the rule below (sized for an H200)."""
    if m < 1:
        raise ConfigError(f"token count must be positive, got {m}")
    bucket = token_bucket(m)
    if tuned is not None and (n, k, bucket) in tuned:
        return tuned[(n, k, bucket)]
    kblocks = k // KBLOCK
    if bucket <= 2:
        # 128 outputs per warp keep a tile's rows inside each thread: the row sums stay local
        block_n = 512
        split = default_split(-(-n // block_n), kblocks, sms)
        return Launch("gemv", block_n=block_n, block_m=bucket, split_k=split, rows=8, prefetch=True)
    if bucket <= 16:
        block_n = 128
        split = default_split(-(-n // block_n), kblocks, sms, waves=2)
        return Launch("dot", block_n=block_n, block_m=16, split_k=split, num_stages=2)
    if bucket <= 64:
        return Launch("dot", block_n=128, block_m=bucket, split_k=1, num_warps=4)
    return Launch("dequant")


def choose_24(
    m: int,
    n: int,
    k: int,
    values: str,
    tuned: dict[tuple[str, int, int, int], Launch] | None = None,
    sms: int = DEFAULT_SMS,
) -> Launch:
    """The launch of a compressed 2:4 matrix-vector product (``values`` is ``bf16`` or ``int4``).
    Tokens go through in passes of at most 2 (``block_m``) over the same weight tile: 4 per pass
    needs more registers than a thread has."""
    if m < 1:
        raise ConfigError(f"token count must be positive, got {m}")
    bucket = token_bucket(m)
    if tuned is not None and (values, n, k, bucket) in tuned:
        return tuned[(values, n, k, bucket)]
    block_n = 512
    split = default_split(-(-n // block_n), k // KBLOCK, sms)
    return Launch("gemv", block_n=block_n, block_m=min(bucket, 2), split_k=split)
