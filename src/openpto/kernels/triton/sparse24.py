"""Triton matrix-vector kernels over compressed 2:4 weights (``gpu_dispatch.compress_24`` layouts).

They read only the kept values and their 2-bit positions: per 4 input columns, two bf16 values
(4.5 bits per column with the positions, against 16 dense) or two int4 codes (3 bits per column,
against 4 for dense int4). A program owns ``BN`` outputs and ``KBP`` kblocks; per kblock it loads
the 4 metadata words and the values of each output, then for each of the 8 groups per word
selects the activations at the kept positions with two compares and two selects per value.
Tokens go through in passes of ``BM`` (at most 4; the dispatch uses 1 or 2) over the same tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from openpto.kernels.gpu_dispatch import KBLOCK, Launch
from openpto.kernels.triton.common import (
    WORKSPACE,
    finish_split,
    nibble_f32,
    scale_zero_ab,
    store_rows,
)


@triton.jit
def _select(xg, valid, is0, is1, is3, is2):
    """The activations at the two kept positions of each group (``xg``: the groups' first
    columns for one token; ``valid``: whether that token exists)."""
    x0 = tl.load(xg, mask=valid, other=0.0).to(tl.float32)[:, None]
    x1 = tl.load(xg + 1, mask=valid, other=0.0).to(tl.float32)[:, None]
    x2 = tl.load(xg + 2, mask=valid, other=0.0).to(tl.float32)[:, None]
    x3 = tl.load(xg + 3, mask=valid, other=0.0).to(tl.float32)[:, None]
    # p0 is 0, 1 or 2 and p1 is 1, 2 or 3, so two tests pick each
    first = tl.where(is0, x0, tl.where(is1, x1, x2))
    second = tl.where(is3, x3, tl.where(is2, x2, x1))
    return first, second


@triton.jit
def _sp24_gemv_kernel(
    x_ptr,
    val_ptr,
    meta_ptr,
    sz_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    M,
    N,
    stride_xm,
    stride_om,
    INT4: tl.constexpr,
    GROUP_KB: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    KBP,
    MP: tl.constexpr,
    SPLIT_K,
    SPLIT_P2: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_r = tl.arange(0, 4)
    for m0 in range(0, M, BM):
        acc0 = tl.zeros([4, BN], tl.float32)
        acc1 = tl.zeros([4, BN], tl.float32)
        acc2 = tl.zeros([4, BN], tl.float32)
        acc3 = tl.zeros([4, BN], tl.float32)
        for i in range(KBP):
            kb = pid_k * KBP + i
            rows = kb * 4 + offs_r
            meta = tl.load(
                meta_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0
            )
            if INT4:
                va = tl.load(
                    val_ptr + (2 * rows)[:, None] * N + offs_n[None, :],
                    mask=mask_n[None, :],
                    other=0,
                )
                vb = tl.load(
                    val_ptr + (2 * rows + 1)[:, None] * N + offs_n[None, :],
                    mask=mask_n[None, :],
                    other=0,
                )
                sz = tl.load(sz_ptr + (kb // GROUP_KB) * N + offs_n, mask=mask_n, other=0)
                a, b = scale_zero_ab(sz)
            for j in tl.static_range(8):
                if INT4:
                    word = va if j < 4 else vb
                    v0 = nibble_f32(word, 2 * (j % 4)) * a[None, :] + b[None, :]
                    v1 = nibble_f32(word, 2 * (j % 4) + 1) * a[None, :] + b[None, :]
                else:
                    pair = tl.load(
                        val_ptr + (rows * 8 + j)[:, None] * N + offs_n[None, :],
                        mask=mask_n[None, :],
                        other=0,
                    )
                    v0 = (pair << 16).to(tl.float32, bitcast=True)
                    v1 = (pair & -65536).to(tl.float32, bitcast=True)
                p0 = (meta >> (4 * j)) & 3
                p1 = (meta >> (4 * j + 2)) & 3
                is0 = p0 == 0
                is1 = p0 == 1
                is3 = p1 == 3
                is2 = p1 == 2
                xg = x_ptr + m0 * stride_xm + rows * 32 + 4 * j
                f, t = _select(xg, m0 < M, is0, is1, is3, is2)
                acc0 += v0 * f + v1 * t
                if BM > 1:
                    f, t = _select(xg + stride_xm, m0 + 1 < M, is0, is1, is3, is2)
                    acc1 += v0 * f + v1 * t
                if BM > 2:
                    f, t = _select(xg + 2 * stride_xm, m0 + 2 < M, is0, is1, is3, is2)
                    acc2 += v0 * f + v1 * t
                    f, t = _select(xg + 3 * stride_xm, m0 + 3 < M, is0, is1, is3, is2)
                    acc3 += v0 * f + v1 * t
        store_rows(
            tl.sum(acc0, axis=0),
            m0,
            offs_n,
            mask_n,
            M,
            N,
            out_ptr,
            stride_om,
            ws_ptr,
            pid_k,
            MP,
            SPLIT_P2,
            False,
        )
        if BM > 1:
            store_rows(
                tl.sum(acc1, axis=0),
                m0 + 1,
                offs_n,
                mask_n,
                M,
                N,
                out_ptr,
                stride_om,
                ws_ptr,
                pid_k,
                MP,
                SPLIT_P2,
                False,
            )
        if BM > 2:
            store_rows(
                tl.sum(acc2, axis=0),
                m0 + 2,
                offs_n,
                mask_n,
                M,
                N,
                out_ptr,
                stride_om,
                ws_ptr,
                pid_k,
                MP,
                SPLIT_P2,
                False,
            )
            store_rows(
                tl.sum(acc3, axis=0),
                m0 + 3,
                offs_n,
                mask_n,
                M,
                N,
                out_ptr,
                stride_om,
                ws_ptr,
                pid_k,
                MP,
                SPLIT_P2,
                False,
            )
    finish_split(
        offs_n,
        mask_n,
        M,
        N,
        out_ptr,
        stride_om,
        ws_ptr,
        lock_ptr,
        pid_n,
        MP,
        SPLIT_K,
        SPLIT_P2,
        False,
    )


@triton.jit
def _sp24_expand_kernel(
    val_ptr,
    meta_ptr,
    sz_ptr,
    wt_ptr,
    N,
    INT4: tl.constexpr,
    GROUP_KB: tl.constexpr,
    BN: tl.constexpr,
):
    """One kblock of a compressed 2:4 weight -> the dense ``W^T [K, N]`` rows, zeros included."""
    kb = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    rows = kb * 4 + tl.arange(0, 4)
    meta = tl.load(meta_ptr + rows[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    if INT4:
        va = tl.load(
            val_ptr + (2 * rows)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0
        )
        vb = tl.load(
            val_ptr + (2 * rows + 1)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0
        )
        sz = tl.load(sz_ptr + (kb // GROUP_KB) * N + offs_n, mask=mask_n, other=0)
        a, b = scale_zero_ab(sz)
    for j in tl.static_range(8):
        if INT4:
            word = va if j < 4 else vb
            v0 = nibble_f32(word, 2 * (j % 4)) * a[None, :] + b[None, :]
            v1 = nibble_f32(word, 2 * (j % 4) + 1) * a[None, :] + b[None, :]
        else:
            pair = tl.load(
                val_ptr + (rows * 8 + j)[:, None] * N + offs_n[None, :],
                mask=mask_n[None, :],
                other=0,
            )
            v0 = (pair << 16).to(tl.float32, bitcast=True)
            v1 = (pair & -65536).to(tl.float32, bitcast=True)
        p0 = (meta >> (4 * j)) & 3
        p1 = (meta >> (4 * j + 2)) & 3
        for c in tl.static_range(4):
            w = tl.where(p0 == c, v0, tl.where(p1 == c, v1, 0.0))
            tl.store(
                wt_ptr + (rows * 32 + 4 * j + c)[:, None] * N + offs_n[None, :],
                w.to(wt_ptr.dtype.element_ty),
                mask=mask_n[None, :],
            )


def expand24(
    values: torch.Tensor,
    meta: torch.Tensor,
    dtype: torch.dtype,
    sz: torch.Tensor | None = None,
    group_size: int = KBLOCK,
    block_n: int = 256,
) -> torch.Tensor:
    """The dense ``W^T [K, N]`` of a compressed 2:4 weight on the GPU, for prefill-sized inputs."""
    r, n = meta.shape
    k = r * 32
    wt = torch.empty(k, n, dtype=dtype, device=meta.device)
    int4 = sz is not None
    _sp24_expand_kernel[(k // KBLOCK, triton.cdiv(n, block_n))](
        values,
        meta,
        sz if int4 else meta,
        wt,
        n,
        INT4=int4,
        GROUP_KB=group_size // KBLOCK,
        BN=block_n,
    )
    return wt


def _p2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def sparse24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    launch: Launch,
    sz: torch.Tensor | None = None,
    group_size: int = KBLOCK,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W^T -> [M, N]`` for a compressed 2:4 weight (int4 values when ``sz`` is set)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = meta.shape[1]
    kblocks = k // KBLOCK
    split = launch.split_k
    if kblocks % split:
        raise ValueError(f"split_k {split} does not divide {kblocks} kblocks")
    n_blocks = triton.cdiv(n, launch.block_n)
    mp = _p2(max(m, launch.block_m))  # whole passes of block_m rows, padding included
    ws, locks = WORKSPACE.get(x.device, split * mp * n if split > 1 else 0, n_blocks)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    int4 = sz is not None
    _sp24_gemv_kernel[(n_blocks, split)](
        x,
        values,
        meta,
        sz if int4 else meta,
        out,
        ws,
        locks,
        m,
        n,
        x.stride(0),
        out.stride(0),
        INT4=int4,
        GROUP_KB=group_size // KBLOCK,
        BM=launch.block_m,
        BN=launch.block_n,
        KBP=kblocks // split,
        MP=mp,
        SPLIT_K=split,
        SPLIT_P2=_p2(split),
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    return out
