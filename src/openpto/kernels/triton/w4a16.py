"""Triton W4A16 kernels: int4 weights (``gpu_dispatch.pack_w4a16`` layout), bf16/fp16 activations.

Three paths, chosen per token count by ``gpu_dispatch.choose_w4a16`` (measured launches in
``tuned.py``):

- ``gemv``: 1-2 tokens on CUDA cores. A program owns a strip of ``BN`` outputs and a share of the
  kblocks (split-K); each thread loads 16-byte vectors of packed words, decodes nibbles with
  ``nibble_f32`` and accumulates in float32 within the thread (factored form: the scale and
  zero-point once per tile). Tokens go through in passes of ``BM`` (1 or 2) over the same words.
- ``dot``: the same tiles, dequantized to bf16 in registers and fed to ``tl.dot`` with K=16 per
  nibble plane (tensor cores), for 3-64 tokens.
- ``dequant``: expand to a bf16 ``[K, N]`` matrix, then cuBLAS: for 128 tokens and more, where it
  measured faster than the fused tiles (docs/benchmarks.md).

Split-K programs finish in-kernel (``common.finish_split``), so every path is a single launch.
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
def _gemv_tile(qw_ptr, step, offs_r, offs_n, mask, N, ROWS: tl.constexpr):
    # step = one ROWS-row slice of a kblock's 16 word rows
    kb = step // (16 // ROWS)
    row0 = kb * 16 + (step % (16 // ROWS)) * ROWS
    return tl.load(qw_ptr + (row0 + offs_r)[:, None] * N + offs_n[None, :], mask=mask, other=0)


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr,
    qw_ptr,
    sz_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    M,
    N,
    stride_xm,
    stride_om,
    GROUP_KB: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    KBP,
    MP: tl.constexpr,
    SPLIT_K,
    SPLIT_P2: tl.constexpr,
    ROWS: tl.constexpr,
    PREFETCH: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Split-K GEMV for ``BM`` (1 or 2) tokens per pass over ``ROWS x BN`` word tiles.

    Factored form: per tile, ``t = sum f x`` per output and ``s = sum x`` over the tile's rows and
    nibbles, then ``acc += a t + b s`` once per tile, so each weight costs a shift, a ``lop3`` and
    one FMA. With ``PREFETCH`` the next tile's loads are issued before this tile's arithmetic.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    mask = mask_n[None, :]
    offs_r = tl.arange(0, ROWS)
    steps = KBP * (16 // ROWS)
    first = pid_k * steps
    for m0 in range(0, M, BM):
        acc0 = tl.zeros([BN], tl.float32)
        acc1 = tl.zeros([BN], tl.float32)
        w_next = _gemv_tile(qw_ptr, first, offs_r, offs_n, mask, N, ROWS)
        for i in range(steps):
            step = first + i
            if PREFETCH:
                w = w_next
                w_next = _gemv_tile(
                    qw_ptr, step + 1, offs_r, offs_n, mask & (i + 1 < steps), N, ROWS
                )
            else:
                w = _gemv_tile(qw_ptr, step, offs_r, offs_n, mask, N, ROWS)
            kb = step // (16 // ROWS)
            sz = tl.load(sz_ptr + (kb // GROUP_KB) * N + offs_n, mask=mask_n, other=0)
            a, b = scale_zero_ab(sz)
            xb = x_ptr + m0 * stride_xm + kb * 128 + (step % (16 // ROWS)) * ROWS + offs_r
            # a and b are constant over the tile's rows, so the rows are summed right away:
            # with BN = 128 outputs per warp a thread holds whole columns, the sum stays in the
            # thread, and only [BN] partials (not [ROWS, BN]) stay live across the nibbles
            t0 = tl.zeros([BN], tl.float32)
            t1 = tl.zeros([BN], tl.float32)
            s0 = tl.zeros([ROWS], tl.float32)
            s1 = tl.zeros([ROWS], tl.float32)
            for j in tl.static_range(8):
                f = nibble_f32(w, j)
                x0 = tl.load(xb + 16 * j).to(tl.float32)
                t0 += tl.sum(f * x0[:, None], axis=0)
                s0 += x0
                if BM > 1:
                    x1 = tl.load(xb + stride_xm + 16 * j, mask=m0 + 1 < M, other=0.0)
                    t1 += tl.sum(f * x1.to(tl.float32)[:, None], axis=0)
                    s1 += x1.to(tl.float32)
            acc0 += a * t0 + b * tl.sum(s0, axis=0)
            if BM > 1:
                acc1 += a * t1 + b * tl.sum(s1, axis=0)
        store_rows(
            acc0, m0, offs_n, mask_n, M, N, out_ptr, stride_om, ws_ptr, pid_k, MP, SPLIT_P2, ATOMIC
        )
        if BM > 1:
            store_rows(
                acc1,
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
                ATOMIC,
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
        ATOMIC,
    )


@triton.jit
def _w4a16_dot_kernel(
    x_ptr,
    qw_ptr,
    sz_ptr,
    out_ptr,
    ws_ptr,
    lock_ptr,
    M,
    N,
    stride_xm,
    stride_om,
    GROUP_KB: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    KBP,
    SPLIT_K,
    SPLIT_P2: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_m = pid_m * BM + tl.arange(0, BM)
    mask_m = offs_m < M
    offs_r = tl.arange(0, 16)
    acc = tl.zeros([BM, BN], tl.float32)
    for i in range(KBP):
        kb = pid_k * KBP + i
        w = tl.load(
            qw_ptr + (kb * 16 + offs_r)[:, None] * N + offs_n[None, :],
            mask=mask_n[None, :],
            other=0,
        )
        sz = tl.load(sz_ptr + (kb // GROUP_KB) * N + offs_n, mask=mask_n, other=0)
        a, b = scale_zero_ab(sz)
        for j in tl.static_range(8):
            wd = (nibble_f32(w, j) * a[None, :] + b[None, :]).to(x_ptr.dtype.element_ty)
            xj = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + (kb * 128 + 16 * j + offs_r)[None, :],
                mask=mask_m[:, None],
                other=0.0,
            )
            acc = tl.dot(xj, wd, acc)
    if SPLIT_P2 == 1:
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_n[None, :],
        )
    else:
        # small-token path only: one m-block, so the workspace rows are the tokens themselves
        tl.store(
            ws_ptr + (pid_k * BM + offs_m[:, None]) * N + offs_n[None, :],
            acc,
            mask=mask_n[None, :],
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
            BM,
            SPLIT_K,
            SPLIT_P2,
            False,
        )


@triton.jit
def _w4a16_dequant_kernel(qw_ptr, sz_ptr, wt_ptr, N, GROUP_KB: tl.constexpr, BN: tl.constexpr):
    kb = tl.program_id(0)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    offs_r = tl.arange(0, 16)
    w = tl.load(
        qw_ptr + (kb * 16 + offs_r)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0
    )
    sz = tl.load(sz_ptr + (kb // GROUP_KB) * N + offs_n, mask=mask_n, other=0)
    a, b = scale_zero_ab(sz)
    for j in tl.static_range(8):
        wd = nibble_f32(w, j) * a[None, :] + b[None, :]
        rows = kb * 128 + 16 * j + offs_r
        tl.store(
            wt_ptr + rows[:, None] * N + offs_n[None, :],
            wd.to(wt_ptr.dtype.element_ty),
            mask=mask_n[None, :],
        )


def _p2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def dequantize(
    qweight: torch.Tensor, sz: torch.Tensor, group_size: int, dtype: torch.dtype, block_n: int = 256
) -> torch.Tensor:
    """The bf16/fp16 ``W^T [K, N]`` of packed int4 buffers, on the GPU."""
    kw, n = qweight.shape
    k = kw * 8
    wt = torch.empty(k, n, dtype=dtype, device=qweight.device)
    grid = (k // KBLOCK, triton.cdiv(n, block_n))
    _w4a16_dequant_kernel[grid](qweight, sz, wt, n, GROUP_KB=group_size // KBLOCK, BN=block_n)
    return wt


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    sz: torch.Tensor,
    group_size: int,
    launch: Launch,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W^T -> [M, N]`` in ``x``'s dtype (bf16 or fp16), into ``out`` if given."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    kblocks = k // KBLOCK
    group_kb = group_size // KBLOCK
    if launch.path == "dequant":
        wt = dequantize(qweight, sz, group_size, x.dtype, launch.block_n)
        return torch.mm(x, wt, out=out) if out is not None else x @ wt
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split = launch.split_k
    if kblocks % split:
        raise ValueError(f"split_k {split} does not divide {kblocks} kblocks")
    n_blocks = triton.cdiv(n, launch.block_n)
    if launch.path == "gemv":
        if launch.block_m not in (1, 2) or launch.rows not in (4, 8, 16):
            raise ValueError(f"gemv takes block_m 1 or 2 and rows 4, 8 or 16, got {launch}")
        mp = _p2(max(m, launch.block_m))  # whole passes of block_m rows, padding included
        ws, locks = WORKSPACE.get(x.device, split * mp * n if split > 1 else 0, n_blocks)
        if launch.atomic:
            ws = WORKSPACE.accumulator(x.device, mp * n)
        _w4a16_gemv_kernel[(n_blocks, split)](
            x,
            qweight,
            sz,
            out,
            ws,
            locks,
            m,
            n,
            x.stride(0),
            out.stride(0),
            GROUP_KB=group_kb,
            BM=launch.block_m,
            BN=launch.block_n,
            KBP=kblocks // split,
            MP=mp,
            SPLIT_K=split,
            SPLIT_P2=_p2(split),
            ROWS=launch.rows,
            PREFETCH=launch.prefetch,
            ATOMIC=launch.atomic,
            num_warps=launch.num_warps,
            num_stages=launch.num_stages,
        )
        return out
    if launch.path == "dot":
        m_blocks = triton.cdiv(m, launch.block_m)
        if split > 1 and m_blocks > 1:
            raise ValueError("split-K dot launches take at most block_m tokens")
        ws, locks = WORKSPACE.get(
            x.device, split * launch.block_m * n if split > 1 else 0, n_blocks
        )
        _w4a16_dot_kernel[(n_blocks, split, m_blocks)](
            x,
            qweight,
            sz,
            out,
            ws,
            locks,
            m,
            n,
            x.stride(0),
            out.stride(0),
            GROUP_KB=group_kb,
            BM=launch.block_m,
            BN=launch.block_n,
            KBP=kblocks // split,
            SPLIT_K=split,
            SPLIT_P2=_p2(split),
            num_warps=launch.num_warps,
            num_stages=launch.num_stages,
        )
        return out
    raise ValueError(f"unknown W4A16 path {launch.path!r}")
