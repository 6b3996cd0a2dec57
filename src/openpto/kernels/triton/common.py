"""Pieces shared by the Triton kernels: nibble decoding, split-K finishing, launch workspaces.

Imports triton at module level: only ``openpto.kernels.triton.linear`` (and benchmarks) import
this, at the point of use.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: PTX inline assembly cannot run in triton's CPU interpreter; there the same bits come from
#: plain integer ops
USE_ASM: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def nibble_f32(w, J: tl.constexpr):
    """``1 + q/16`` as float32 for the 4-bit field ``J`` of each int32 word.

    Moving the field into mantissa bits 19..22 under the exponent of 1.0 turns it into a float
    with one shift and one ``lop3`` (and-or with two constants, which the compiler otherwise
    splits into two instructions), avoiding the int-to-float unit (a quarter of the FMA rate).
    ``a * f + b`` with ``a = 16s`` and ``b = -s (16 + z)`` is the weight ``(q - z) s``, and
    ``sum(x f)`` over a group is ``sum(x) + sum(x q) / 16``.
    """
    if J * 4 <= 19:  # noqa: SIM108 (a constexpr branch, resolved at compile time)
        v = w << (19 - 4 * J)
    else:
        v = w >> (4 * J - 19)
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, 0x00780000, 0x3F800000, 0xEA;",
            "=r,r",
            [v],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    else:
        return ((v & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def scale_zero_ab(sz):
    """``sz`` words (bf16 scale low, bf16 zero high) -> ``(a, b)`` for ``nibble_f32``."""
    s = (sz << 16).to(tl.float32, bitcast=True)
    z = (sz & -65536).to(tl.float32, bitcast=True)
    return 16.0 * s, -s * (16.0 + z)


@triton.jit
def store_rows(
    y,
    m,
    offs_n,
    mask_n,
    M,
    N,
    out_ptr,
    stride_om,
    ws_ptr,
    pid_k,
    MP,
    SPLIT_P2: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Write one token's partial sums ``y [BN]``: straight to the output without split-K, to
    this program's slice of the float32 workspace ``[split, MP, N]``, or (``ATOMIC``) added into
    the zeroed float32 accumulator ``[MP, N]``."""
    if SPLIT_P2 == 1:
        tl.store(
            out_ptr + m * stride_om + offs_n,
            y.to(out_ptr.dtype.element_ty),
            mask=mask_n & (m < M),
        )
    elif ATOMIC:
        tl.atomic_add(ws_ptr + m * N + offs_n, y, mask=mask_n & (m < M), sem="relaxed")
    else:
        tl.store(ws_ptr + (pid_k * MP + m) * N + offs_n, y, mask=mask_n)


@triton.jit
def finish_split(
    offs_n,
    mask_n,
    M,
    N,
    out_ptr,
    stride_om,
    ws_ptr,
    lock_ptr,
    lock_id,
    MP: tl.constexpr,
    SPLIT_K,
    SPLIT_P2: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """The last of the ``SPLIT_K`` programs of an output strip to arrive sums the partials in a
    fixed order (so results are deterministic) and resets the strip's counter for the next launch.

    The barrier before the counter makes every thread's partial stores happen before thread 0's
    release; the acquire on the counter orders the reads after them (the layer-norm backward
    tutorial's lock pattern). Each token's partials load as one ``[SPLIT_P2, BN]`` tile, so the
    fix-up costs one memory round trip rather than one per split. With ``ATOMIC`` the partials
    were already added into one accumulator (in no fixed order: the last bits may differ between
    runs), and the last program swaps it back to zero while reading it, so its cost does not grow
    with the split.
    """
    if SPLIT_P2 > 1:
        tl.debug_barrier()
        count = tl.atomic_add(lock_ptr + lock_id, 1, sem="acq_rel", scope="gpu")
        if count == SPLIT_K - 1:
            offs_s = tl.arange(0, SPLIT_P2)
            for m in tl.static_range(MP):
                if ATOMIC and m < M:
                    bits = (ws_ptr + m * N + offs_n).to(tl.pointer_type(tl.int32))
                    old = tl.atomic_xchg(bits, 0, mask=mask_n, sem="relaxed")
                    total = old.to(tl.float32, bitcast=True)
                    tl.store(
                        out_ptr + m * stride_om + offs_n,
                        total.to(out_ptr.dtype.element_ty),
                        mask=mask_n,
                    )
                elif m < M:
                    part = tl.load(
                        ws_ptr + (offs_s[:, None] * MP + m) * N + offs_n[None, :],
                        mask=(offs_s[:, None] < SPLIT_K) & mask_n[None, :],
                        other=0.0,
                        cache_modifier=".cg",
                    )
                    total = tl.sum(part, axis=0)
                    tl.store(
                        out_ptr + m * stride_om + offs_n,
                        total.to(out_ptr.dtype.element_ty),
                        mask=mask_n,
                    )
            tl.atomic_xchg(lock_ptr + lock_id, 0, sem="relaxed", scope="gpu")


class Workspace:
    """Per-device float32 scratch for split-K partial sums and int32 arrival counters.

    Counters are left at zero by every launch, so buffers are allocated once and reused; a
    larger request allocates larger buffers and keeps the old ones alive, so CUDA graphs captured
    earlier never point at freed memory.
    """

    def __init__(self) -> None:
        self._acc: dict[int | str, torch.Tensor] = {}
        self._ws: dict[int | str, torch.Tensor] = {}
        self._locks: dict[int | str, torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []

    def get(
        self, device: torch.device, floats: int, locks: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx: int | str = device.index if device.index is not None else device.type
        if device.type == "cuda" and device.index is None:
            idx = torch.cuda.current_device()
        ws = self._ws.get(idx)
        if ws is None or ws.numel() < floats:
            if ws is not None:
                self._retired.append(ws)
            ws = torch.empty(max(floats, 1 << 20), dtype=torch.float32, device=device)
            self._ws[idx] = ws
        lk = self._locks.get(idx)
        if lk is None or lk.numel() < locks:
            if lk is not None:
                self._retired.append(lk)
            lk = torch.zeros(max(locks, 1 << 14), dtype=torch.int32, device=device)
            self._locks[idx] = lk
        return ws, lk

    def accumulator(self, device: torch.device, floats: int) -> torch.Tensor:
        """Zeroed float32 buffer for atomic split-K; every launch leaves it zeroed again."""
        idx: int | str = device.index if device.index is not None else device.type
        if device.type == "cuda" and device.index is None:
            idx = torch.cuda.current_device()
        acc = self._acc.get(idx)
        if acc is None or acc.numel() < floats:
            if acc is not None:
                self._retired.append(acc)
            acc = torch.zeros(max(floats, 1 << 20), dtype=torch.float32, device=device)
            self._acc[idx] = acc
        return acc


WORKSPACE = Workspace()
