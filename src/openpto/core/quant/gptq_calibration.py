"""GPTQ over a whole model: layer-sequential calibration feeding ``gptq_solve``.

Rows never interact in GPTQ, so Linears that read the same input (q/k/v, gate/up) are solved as
one matrix, their rows stacked, with one Hessian and one Cholesky factor: the same codes as one
solve each, fewer passes of the Python column loop. By default (``true_sequential``) a layer is
calibrated in one pass (``run_linear_sequential``), under bfloat16 autocast where the hardware
has it (``calib_dtype``), and each Linear is first refitted to the float model's outputs
(``float_targets``: see ``openpto.core.hessian.refit_to_float_outputs``).
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
    hessian_of,
    input_shift,
    refit_to_float_outputs,
)
from openpto.core.quant.common import InputCollector, relative_output_error, run_calibrated
from openpto.core.quant.configs import GPTQConfig
from openpto.core.quant.gptq import gptq_solve, solve_thread
from openpto.core.quant.primitives import resolve_group_size
from openpto.core.quant.tensor import QuantizedWeight
from openpto.errors import DataError


def _rows(qw: QuantizedWeight, start: int, stop: int) -> QuantizedWeight:
    return QuantizedWeight(
        qw.q[start:stop], qw.scale[start:stop], qw.zero[start:stop],
        qw.bits, qw.group_size, qw.symmetric,
    )


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
            hessian = hessian_of(inputs.detach(), first.weight.device, self.dtype,
                                 self.config.damp)
            targets = None
            if float_inputs is not None and self.config.float_targets:
                targets = self._float_targets(inputs.detach(), float_inputs, hessian)
        return self._solve(index, prefix, linears, hessian.H, clock, targets,
                           str(hessian.dtype).removeprefix("torch."))

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
            H = hessian_of(subset, H.device, self.dtype, self.config.damp).H
        return FloatTargets(input_shift(float_inputs, subset, self.dtype), H)

    def _solve(
        self,
        index: int,
        prefix: str,
        linears: dict[str, nn.Linear],
        H: torch.Tensor,
        clock: PhaseClock,
        targets: FloatTargets | None = None,
        products: str = "float32",
    ) -> list[LinearReport]:
        """One GPTQ solve for Linears sharing ``H``; with ``targets``, of the weights refitted
        to the float model's outputs first. Each Linear gets its rows back, dequantized.
        ``products``: the dtype of the Hessian's products, for the trace."""
        started = time.perf_counter()
        single = solve_thread() if H.device.type == "cpu" else contextlib.nullcontext()
        with single, clock("solve"):
            weights = [linear.weight.data.float() for linear in linears.values()]
            stacked = torch.cat(weights)
            # Relative change of the weights by the refit; None where it could not be made.
            refit: float | None = 0.0
            if targets is not None:
                target = refit_to_float_outputs(stacked, targets.H, targets.shift,
                                                self.config.damp)
                if target is None:
                    refit = None
                else:
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
                    extra={"damp": damp, "solved_with": list(linears), "refit": refit,
                           "hessian_products": products},
                ))
        return reports


class _TimedHessian(HessianAccumulator):
    def __init__(self, columns: int, device: torch.device, clock: PhaseClock) -> None:
        super().__init__(columns, device)
        self.clock = clock

    def add_batch(self, x: torch.Tensor) -> None:
        with self.clock("hessian"):
            super().add_batch(x)


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
    return CompressionResult.since(started, config, reports, where)


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
