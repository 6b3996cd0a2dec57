"""GPTQ (Frantar et al., 2022): quantize one column at a time and push each rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

One ``GPTQ`` object per Linear, as in the paper's reference: ``add_batch`` accumulates
``H = 2 X X^T / n`` (in ``openpto.core.hessian``), ``quantize`` runs the blocked column loop and
returns a ``GPTQResult``, ``free`` drops the Hessian. The reported error is the relative output
error ``||(W - W') X||^2 / ||W X||^2`` on the calibration inputs.

Rows never interact in GPTQ, so Linears that read the same input (q/k/v, gate/up) are solved as
one matrix, their rows stacked, with one Hessian and one Cholesky factor: the same codes as one
solve each, fewer passes of the Python column loop. By default (``true_sequential``) a layer is
calibrated in one pass (``run_linear_sequential``), under bfloat16 autocast where the hardware
has it (``calib_dtype``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from openpto.core.calibrate import (
    CompressionResult,
    LayerCallback,
    LayerEvent,
    LinearReport,
    PhaseClock,
    RunLayer,
    find_linears,
    run_linear_sequential,
)
from openpto.core.hessian import (
    HessianAccumulator,
    input_shift,
    inverse_cholesky,
    refit_to_float_outputs,
)
from openpto.core.quant.common import InputCollector, relative_output_error, run_calibrated
from openpto.core.quant.configs import GPTQConfig
from openpto.core.quant.primitives import compute_qparams, resolve_group_size
from openpto.core.quant.tensor import QuantizedWeight
from openpto.core.threads import intra_op_threads
from openpto.errors import DataError
from openpto.registry import TRANSFORMS


@dataclass
class GPTQResult:
    quantized: QuantizedWeight  # codes in the original column order
    error: float  # relative output error on the calibration inputs
    damp: float  # dampening that made the Cholesky succeed (relative to the mean diagonal)
    perm: torch.Tensor | None  # the act-order column order used during the pass
    seconds: float


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return (torch.round(w / scale) + zero).clamp(0, maxq)


def _one_thread() -> contextlib.AbstractContextManager[None]:
    """The solve is thousands of tiny ops and a few small factorisations: a second intra-op
    thread only adds handoffs, and on a busy machine a descheduled worker stalls every one of
    them (measured: the 3072 x 576 gate/up solve took 1.06 CPU-s on 2 threads, 0.14 on 1)."""
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

    with _one_thread() if W.device.type == "cpu" else contextlib.nullcontext():
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


def _rows(qw: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    return QuantizedWeight(
        qw.q[start:stop], qw.scale[start:stop], qw.zero[start:stop],
        qw.bits, qw.group_size, qw.symmetric,
    )


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


def calib_dtype(config: GPTQConfig, device: torch.device | str) -> torch.dtype:
    """The dtype of the calibration pass: ``auto`` is bfloat16 where matmuls have it natively
    (CUDA with bf16, CPUs with AVX512-BF16 or AMX), float32 elsewhere."""
    if config.calib_dtype != "auto":
        return getattr(torch, config.calib_dtype)  # type: ignore[no-any-return]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_has_bf16() -> bool:
    # torch reports AVX512 for both AVX512 and AVX512-BF16 parts; only the flags tell them apart,
    # and without the instructions oneDNN emulates bfloat16 more slowly than float32.
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


@dataclass
class FloatTargets:
    """What the refit to the float model's outputs needs, over the samples the float stream ran."""

    shift: torch.Tensor  # ``input_shift``: float-model inputs minus these, against these
    H: torch.Tensor  # the Hessian of the same samples


class GPTQCompressor:
    """The per-layer step: Hessians for every distinct input, then one GPTQ solve per input.

    ``compress_layer`` is the two-pass form (``run_layer_sequential``: one pass to collect, one
    to propagate); ``compress_group`` the one-pass form (``run_linear_sequential``).
    """

    def __init__(self, config: GPTQConfig, dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.dtype = dtype  # of the inputs in the Hessian product; H is float32 either way
        self.clock = PhaseClock()

    def compress_layer(
        self, index: int, prefix: str, layer: nn.Module, run_layer: RunLayer
    ) -> list[LinearReport]:
        linears = find_linears(layer)
        for linear in linears.values():
            resolve_group_size(linear.in_features, self.config.group_size)
        clock = self.clock
        collector = InputCollector(
            linears, lambda lin: _TimedHessian(lin.in_features, lin.weight.device, clock)
        )
        try:
            run_layer()
        finally:
            collector.remove()
        members: dict[str, list[str]] = {}
        for name in linears:
            owner = collector.shared_with.get(name, name)
            members.setdefault(owner, []).append(name)
        reports = []
        for owner, names in members.items():
            group = {name: linears[name] for name in names}
            reports += self._solve(index, prefix, group, collector.sinks[owner].H, clock)
        return reports

    def compress_group(
        self,
        index: int,
        prefix: str,
        linears: dict[str, nn.Linear],
        inputs: torch.Tensor,
        clock: PhaseClock,
        float_inputs: torch.Tensor | None = None,
    ) -> list[LinearReport]:
        first = next(iter(linears.values()))
        for linear in linears.values():
            resolve_group_size(linear.in_features, self.config.group_size)
        with clock("hessian"):
            hessian = HessianAccumulator(first.in_features, first.weight.device, self.dtype)
            hessian.add_batch(inputs.detach())
            targets = None
            if float_inputs is not None and self.config.float_targets:
                targets = self._float_targets(inputs.detach(), float_inputs, hessian)
        return self._solve(index, prefix, linears, hessian.H, clock, targets)

    def _float_targets(
        self, inputs: torch.Tensor, float_inputs: torch.Tensor, hessian: HessianAccumulator
    ) -> FloatTargets:
        # The float stream may carry only the first samples: the refit takes both statistics from
        # those. (A shift from a few samples against the Hessian of all of them is no one's
        # least-squares fit: its noise along H's weak directions is amplified without bound;
        # measured perplexity in the millions on the default model.)
        subset = inputs[: float_inputs.shape[0]]
        H = hessian.H
        if subset.shape[0] < inputs.shape[0]:
            sub = HessianAccumulator(hessian.columns, H.device, self.dtype)
            sub.add_batch(subset)
            H = sub.H
        return FloatTargets(input_shift(float_inputs, subset, self.dtype), H)

    def _solve(
        self,
        index: int,
        prefix: str,
        linears: dict[str, nn.Linear],
        H: torch.Tensor,
        clock: PhaseClock,
        targets: FloatTargets | None = None,
    ) -> list[LinearReport]:
        with _one_thread() if H.device.type == "cpu" else contextlib.nullcontext():
            return self._solve_group(index, prefix, linears, H, clock, targets)

    def _solve_group(
        self,
        index: int,
        prefix: str,
        linears: dict[str, nn.Linear],
        H: torch.Tensor,
        clock: PhaseClock,
        targets: FloatTargets | None,
    ) -> list[LinearReport]:
        """One GPTQ solve for Linears sharing ``H``; with ``targets``, of the weights refitted
        to the float model's outputs first."""
        started = time.perf_counter()
        with clock("solve"):
            weights = [linear.weight.data.float() for linear in linears.values()]
            stacked = torch.cat(weights)
            refit = 0.0
            if targets is not None:
                target = refit_to_float_outputs(stacked, targets.H, targets.shift,
                                                self.config.damp)
                refit = float((target - stacked).norm() / stacked.norm().clamp_min(1e-30))
                stacked = target
            qw, damp, _ = gptq_solve(stacked, H, self.config)
        solved = time.perf_counter() - started
        reports = []
        row = 0
        with clock("pack"):
            for (name, linear), w in zip(linears.items(), weights, strict=True):
                part = _rows(qw, row, row + w.shape[0])
                row += w.shape[0]
                dequantized = part.dequantize()
                linear.weight.data = dequantized.to(linear.weight.dtype)
                # Seconds: the shared solve, split by rows.
                seconds = solved * w.shape[0] / qw.out_features
                reports.append(LinearReport(
                    index, f"{prefix}.{name}", relative_output_error(w, dequantized, H), seconds,
                    quantized=part.to("cpu"),
                    extra={"damp": damp, "solved_with": list(linears), "refit": refit},
                ))
        return reports


class _TimedHessian(HessianAccumulator):
    def __init__(self, columns: int, device: torch.device, clock: PhaseClock) -> None:
        super().__init__(columns, device)
        self.clock = clock

    def add_batch(self, x: torch.Tensor) -> None:
        with self.clock("hessian"):
            super().add_batch(x)


@TRANSFORMS.register(GPTQConfig)
def gptq_transform(
    model: nn.Module,
    config: GPTQConfig,
    calibration: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    on_layer: LayerCallback | None = None,
) -> CompressionResult:
    where = torch.device(device) if device is not None else next(model.parameters()).device
    if not config.true_sequential:
        compressor = GPTQCompressor(config)
        return run_calibrated(model, config, calibration, compressor, device=device,
                              on_layer=_with_phases(compressor.clock, on_layer))
    if calibration is None or calibration.numel() == 0:
        raise DataError(
            f"{config.type_name} needs calibration token ids (a LongTensor [samples, seq_len])"
        )
    dtype = calib_dtype(config, where)
    started = time.perf_counter()
    reports = run_linear_sequential(
        model, calibration, GPTQCompressor(config, dtype), device=where, dtype=dtype,
        on_layer=on_layer, float_samples=float_samples(config, calibration.shape[0]),
    )
    return CompressionResult(config.type_name, config.to_dict(), reports,
                             time.perf_counter() - started, str(where))


def float_samples(config: GPTQConfig, samples: int) -> int:
    """How many calibration samples the float stream runs (0: no float targets)."""
    if not config.float_targets:
        return 0
    return samples if config.float_target_samples is None else min(
        config.float_target_samples, samples)


def _with_phases(clock: PhaseClock, on_layer: LayerCallback | None) -> LayerCallback | None:
    """Adds the two-pass compressor's phases to each layer event; the rest was forward passes."""
    if on_layer is None:
        return None
    last_cpu = [time.process_time()]

    def report(event: LayerEvent) -> None:
        wall, cpu = clock.take()
        now = time.process_time()
        wall["forward"] = max(event.seconds - sum(wall.values()), 0.0)
        cpu["forward"] = max(now - last_cpu[0] - sum(cpu.values()), 0.0)
        last_cpu[0] = now
        event.phases, event.phases_cpu = wall, cpu
        on_layer(event)

    return report
