"""GPTQ (Frantar et al., 2022): quantize one column at a time and push each rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

One ``GPTQ`` object per Linear, as in the paper's reference: ``add_batch`` accumulates
``H = 2 X X^T / n`` (in ``openpto.core.hessian``), ``quantize`` runs the blocked column loop and
returns a ``GPTQResult``, ``free`` drops the Hessian. The reported error is the relative output
error ``||(W - W') X||^2 / ||W X||^2`` on the calibration inputs. How a whole model is calibrated
(layer by layer, stacked solves, float targets) is in ``gptq_calibration``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from openpto.core.hessian import HessianAccumulator, inverse_cholesky
from openpto.core.quant.common import relative_output_error
from openpto.core.quant.configs import GPTQConfig
from openpto.core.quant.primitives import compute_qparams, resolve_group_size
from openpto.core.quant.tensor import QuantizedWeight
from openpto.core.threads import intra_op_threads


@dataclass
class GPTQResult:
    quantized: QuantizedWeight  # codes in the original column order
    error: float  # relative output error on the calibration inputs
    damp: float  # dampening that made the Cholesky succeed (relative to the mean diagonal)
    perm: torch.Tensor | None  # the act-order column order used during the pass
    seconds: float


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return (torch.round(w / scale) + zero).clamp(0, maxq)


def solve_thread() -> contextlib.AbstractContextManager[None]:
    """The solve is thousands of tiny ops and a few small factorisations: a second intra-op
    thread only adds handoffs, and on a busy machine a descheduled worker stalls every one of
    them (measured: the 3072 x 576 gate/up solve took 1.06 CPU-s on 2 threads of a loaded
    machine with the old column loop; the current loop takes 0.10 on 1)."""
    return intra_op_threads(1)


@torch.no_grad()
def gptq_solve(
    W0: torch.Tensor, H: torch.Tensor, config: GPTQConfig
) -> tuple[QuantizedWeight, float, torch.Tensor | None]:
    """Quantize ``W0`` (float32 ``[rows, cols]``) against ``H``: the codes, the dampening used and
    the act-order permutation."""
    W = W0.clone()
    rows, cols = W.shape
    g = resolve_group_size(cols, config.group_size)
    maxq = 2**config.bits - 1
    groups = cols // g
    scale = torch.zeros(rows, groups, device=W.device)
    zero = torch.zeros_like(scale)
    # Static groups (and per-channel, where there is one group) fix every group's grid from the
    # original weights, in the original column order: the codes then need no g_idx.
    static = config.static_groups or groups == 1
    if static:
        scale, zero = compute_qparams(W, config.bits, g, config.symmetric)

    perm = None
    if config.act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    factor = inverse_cholesky(H, config.damp)
    Hinv = factor.upper
    # A Python list: indexing a device tensor per column would sync the GPU every column.
    column = perm.tolist() if perm is not None else list(range(cols))

    with solve_thread() if W.device.type == "cpu" else contextlib.nullcontext():
        if static:
            index = torch.tensor(column, device=W.device) // g
            Q = _static_columns(W, Hinv, scale[:, index], zero[:, index], maxq, config.block_size)
        else:
            Q = _dynamic_columns(W, Hinv, scale, zero, column, g, config)

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    qw = QuantizedWeight(Q, scale, zero, config.bits, g, config.symmetric)
    return qw, factor.damp, perm


def _static_columns(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    maxq: int,
    block: int,
) -> torch.Tensor:
    """The column loop when every column's grid is known up front (``scales``/``zeros`` given
    per column, in the order of ``W``'s columns): the codes, uint8 ``[rows, cols]``.

    Work is transposed, so each column is one contiguous row, and each error is left undivided
    by its pivot ``Hinv[i, i]``, whose row of ``Hinv`` is divided instead: the Python loop
    issues nine small ops per column, the part of the solve that does not shrink with BLAS.
    """
    WT = W.t().contiguous()
    ST, ZT = scales.t().contiguous(), zeros.t().contiguous()
    cols = WT.shape[0]
    QT = torch.empty_like(WT)
    Hs = Hinv / Hinv.diagonal().unsqueeze(1)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Err1 = WT[i1:i2], torch.empty_like(WT[i1:i2])
        w_rows, q_rows, e_rows = W1.unbind(0), QT[i1:i2].unbind(0), Err1.unbind(0)
        s_rows, z_rows = ST[i1:i2].unbind(0), ZT[i1:i2].unbind(0)
        for i in range(i2 - i1):
            w, q = w_rows[i], q_rows[i]
            torch.div(w, s_rows[i], out=q)
            q.round_().add_(z_rows[i]).clamp_(0, maxq)
            dq = (q - z_rows[i]).mul_(s_rows[i])
            torch.sub(w, dq, out=e_rows[i])
            if i + 1 < i2 - i1:
                W1[i + 1 :].addr_(Hs[i1 + i, i1 + i + 1 : i2], e_rows[i], alpha=-1)
        # Lazy batch update: the columns after the block see all of its errors at once.
        if i2 < cols:
            WT[i2:].addmm_(Hs[i1:i2, i2:].t(), Err1, alpha=-1)
    return QT.to(torch.uint8).t().contiguous()


def _dynamic_columns(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    column: list[int],
    g: int,
    config: GPTQConfig,
) -> torch.Tensor:
    """The column loop when each group's grid is fixed as its first column is reached (no
    act-order, no static groups); fills ``scale``/``zero`` and returns the codes."""
    rows, cols = W.shape
    maxq = 2**config.bits - 1
    Q = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    bs = config.block_size
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = column[i1 + i]
            gi = col // g
            if col % g == 0:
                # Fix the group's grid from the weights as updated so far (the block's pending
                # updates included).
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                s, z = compute_qparams(current, config.bits, g, config.symmetric)
                scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
            w = W1[:, i]
            q = _round(w, scale[:, gi], zero[:, gi], maxq)
            Q[:, i1 + i] = q.to(torch.uint8)
            err = (w - (q - zero[:, gi]) * scale[:, gi]) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        # Lazy batch update: the columns after the block see all of its errors at once.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


class GPTQ:
    def __init__(self, linear: nn.Linear, hessian: HessianAccumulator | None = None) -> None:
        self.linear = linear
        # Linears fed the same input (q/k/v) may share one accumulator.
        self.hessian: HessianAccumulator | None = hessian or HessianAccumulator(
            linear.in_features, device=linear.weight.device
        )

    def add_batch(self, x: torch.Tensor) -> None:
        assert self.hessian is not None, "add_batch after free()"
        self.hessian.add_batch(x)

    @torch.no_grad()
    def quantize(self, config: GPTQConfig) -> GPTQResult:
        started = time.perf_counter()
        assert self.hessian is not None, "quantize after free()"
        W0 = self.linear.weight.data.float()
        qw, damp, perm = gptq_solve(W0, self.hessian.H, config)
        error = relative_output_error(W0, qw.dequantize(), self.hessian.H)
        return GPTQResult(qw, error, damp, perm, time.perf_counter() - started)

    def free(self) -> None:
        self.hessian = None
