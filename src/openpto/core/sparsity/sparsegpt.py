"""SparseGPT (Frantar & Alistarh 2023) for one Linear, optionally quantizing in the same pass.

The weight is processed column by column in blocks of ``block_size``. Before each block (or, for
N:M, before each group of M columns) the mask is chosen adaptively from the weights as they are
*after* the updates of earlier columns, scoring ``w^2 / [H^-1]_jj^2`` (the OBS saliency). Each
column is then pruned (and, in joint mode, quantized) and its error is spread over the columns not
yet processed through the upper Cholesky factor of ``H^-1`` — the same machinery as GPTQ, taken
from ``openpto.core.hessian``.

Joint mode (``bits`` set): the group-wise grid of ``openpto.core.quant`` is fitted when the pass
reaches a group's first column, from the current weights with the already-pruned entries zeroed.
Min/max quantization always puts 0 inside the range with an integer zero-point, so a pruned
weight (exactly 0) gets the code ``zero`` and dequantizes to exactly 0; the codes of pruned
entries are also set to ``zero`` explicitly, so the mask survives any rounding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from openpto.core.hessian import inverse_cholesky
from openpto.core.quant.primitives import compute_qparams, resolve_group_size
from openpto.core.quant.tensor import QuantizedWeight
from openpto.core.sparsity.configs import check_nm_width
from openpto.core.sparsity.masks import layer_mask


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # float32 [out, in]: what the Linear computes with (dequantized if joint)
    mask: torch.Tensor  # bool [out, in], True where kept
    quantized: QuantizedWeight | None  # joint mode only; pruned entries dequantize to exactly 0
    loss: float  # sum over rows of the OBS loss (w - q)^2 / [H^-1]_jj^2 / 2
    damp: float  # the dampening that made the Cholesky factorisation succeed
    seconds: float


@torch.no_grad()
def sparsegpt(
    weight: torch.Tensor,
    H: torch.Tensor,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
) -> SparseGPTResult:
    """Prune ``weight`` ``[out, in]`` against the Hessian ``H`` ``[in, in]`` of its inputs.

    Exactly one of ``sparsity`` (unstructured, chosen per block) and ``nm`` (N kept of every M
    along the input dimension) must be given.
    """
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity and nm")
    started = time.perf_counter()
    rows, columns = weight.shape
    if nm is not None:
        check_nm_width(columns, nm)
    group = resolve_group_size(columns, group_size) if bits is not None else columns
    maxq = 2**bits - 1 if bits is not None else 0

    W = weight.detach().to(torch.float32).clone()
    factor = inverse_cholesky(H.to(W.device, torch.float32), damp)
    W[:, factor.dead] = 0
    Hinv = factor.upper
    mask = torch.zeros(rows, columns, dtype=torch.bool, device=W.device)
    if bits is not None:
        scales = torch.ones(rows, columns // group, device=W.device)
        zeros = torch.zeros(rows, columns // group, device=W.device)
        codes = torch.zeros(rows, columns, dtype=torch.uint8, device=W.device)
    losses = torch.zeros(rows, device=W.device, dtype=torch.float64)

    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = torch.diagonal(Hinv1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if sparsity is not None:
            keep1 = layer_mask(W1**2 / diag.unsqueeze(0) ** 2, sparsity)
        for i in range(count):
            col = i1 + i
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = W1[:, i : i + m] ** 2 / diag[i : i + m].unsqueeze(0) ** 2
                prune = torch.topk(saliency, m - n, dim=1, largest=False).indices
                keep1[:, i : i + m] = True
                keep1[:, i : i + m].scatter_(1, prune, False)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            if bits is not None:
                gi = col // group
                if col % group == 0:
                    # The group's grid comes from the weights as updated so far; entries beyond
                    # this block have not received this block's lazy update yet (as in GPTQ).
                    current = torch.cat((W1[:, i:], W[:, i2:]), dim=1)[:, :group]
                    later = torch.ones_like(W[:, i2:], dtype=torch.bool)
                    known = torch.cat((keep1[:, i:], later), dim=1)
                    current = current * known[:, :group]
                    scale, zero = compute_qparams(current, bits, group, symmetric)
                    scales[:, gi : gi + 1], zeros[:, gi : gi + 1] = scale, zero
                s, z = scales[:, gi], zeros[:, gi]
                c = (torch.round(q / s) + z).clamp(0, maxq)
                c = torch.where(keep1[:, i], c, z)
                codes[:, col] = c.to(torch.uint8)
                q = (c - z) * s
            Q1[:, i] = q
            losses += ((w - q) ** 2 / d**2).double() / 2
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    quantized = None
    if bits is not None:
        quantized = QuantizedWeight(codes, scales, zeros, bits, group, symmetric)
    return SparseGPTResult(
        weight=W,
        mask=mask,
        quantized=quantized,
        loss=float(losses.sum()),
        damp=factor.damp,
        seconds=time.perf_counter() - started,
    )
