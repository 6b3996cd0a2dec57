"""Layer-sequential calibration: one decoder layer on the device at a time.

The inputs of decoder layer 0 are captured for every calibration sample; then each layer is
handed to a ``LayerCompressor`` together with a function that runs all samples through it (so
the compressor's hooks can collect activations), and the layer's outputs — computed with its
weights already compressed — become the next layer's inputs. Errors therefore propagate the way
they will at inference, and peak memory is one layer plus the activations, whatever the depth.

``run_linear_sequential`` is the one-pass variant ("true sequential" in GPTQ's reference code):
all samples go through each layer as one batch, and each Linear is compressed inside its own
forward pre-hook, from inputs computed by the Linears before it, already compressed. Every Linear
then runs once per layer instead of twice, optionally under bfloat16 autocast. With
``float_samples`` a second stream of hidden states (of some or all samples) runs through the
layers with their original weights, and each Linear also receives its inputs from that float
model: the outputs a method can fit its compressed Linear to, rather than the Linear's own float
outputs on inputs that already carry the upstream error.

This module is pure torch: progress, traces and saving belong to ``openpto.pipeline``, which
passes ``on_layer`` to receive one ``LayerEvent`` per layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from openpto.architectures import architecture_of
from openpto.errors import UnsupportedModel

if TYPE_CHECKING:
    from openpto.config import MethodConfig


@dataclass
class LinearReport:
    """What happened to one Linear: its error, its time and what it became."""

    layer_index: int
    name: str  # full module name, e.g. "model.layers.3.self_attn.q_proj"
    error: float  # method-specific reconstruction loss (documented by each method)
    seconds: float
    quantized: Any = None  # openpto.core.quant.tensor.QuantizedWeight, when quantized
    mask: torch.Tensor | None = None  # bool [out, in] of kept weights, when pruned
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerEvent:
    index: int
    total: int
    seconds: float
    reports: list[LinearReport]
    peak_memory_bytes: int | None
    # Wall and CPU seconds per phase ("forward", "hessian", "solve", "pack"), where measured.
    phases: dict[str, float] = field(default_factory=dict)
    phases_cpu: dict[str, float] = field(default_factory=dict)


class PhaseClock:
    """Wall and CPU seconds (all threads of the process) spent per named phase."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[phase] = self.wall.get(phase, 0.0) + time.perf_counter() - wall
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - cpu

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        """The totals so far, and start again from zero."""
        wall, cpu = self.wall, self.cpu
        self.wall, self.cpu = {}, {}
        return wall, cpu


@dataclass
class CompressionResult:
    method: str
    config: dict[str, Any]
    reports: list[LinearReport]
    seconds: float
    device: str

    @classmethod
    def since(cls, started: float, config: MethodConfig, reports: list[LinearReport],
              device: str | torch.device) -> CompressionResult:
        """The result of a pass over the model begun at ``time.perf_counter()`` ``started``."""
        return cls(method=config.type_name, config=config.to_dict(), reports=reports,
                   seconds=time.perf_counter() - started, device=str(device))

    def quantized_weights(self) -> dict[str, Any]:
        return {r.name: r.quantized for r in self.reports if r.quantized is not None}

    def masks(self) -> dict[str, torch.Tensor]:
        return {r.name: r.mask for r in self.reports if r.mask is not None}


RunLayer = Callable[[], None]
LayerCallback = Callable[[LayerEvent], None]


class LayerCompressor(Protocol):
    def compress_layer(
        self, index: int, prefix: str, layer: nn.Module, run_layer: RunLayer
    ) -> list[LinearReport]:
        """Compress the Linears of ``layer`` in place (writing back the weights the model should
        compute with from now on) and report each. ``run_layer()`` pushes every calibration
        sample through the layer as it currently is; call it as often as the method needs."""
        ...


class LinearGroupCompressor(Protocol):
    def compress_group(
        self,
        index: int,
        prefix: str,
        linears: dict[str, nn.Linear],
        inputs: torch.Tensor,
        clock: PhaseClock,
        float_inputs: torch.Tensor | None = None,
    ) -> list[LinearReport]:
        """Compress ``linears`` (names relative to the layer), which all read ``inputs`` (every
        calibration token at once), in place, and report each; time the work with ``clock``.
        ``float_inputs``, when given, are the same Linears' inputs in the uncompressed model, token
        for token."""
        ...


class _Captured(Exception):
    """Raised by the layer-0 stand-in to stop the forward pass once its inputs are caught."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list and its module path, from the model's architecture adapter."""
    return architecture_of(model).decoder_layers(model)


def find_linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def _move_kwargs(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            moved[key] = tuple(v.to(device) for v in value)
        else:
            moved[key] = value
    return moved


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, calibration: torch.Tensor, device: torch.device, batch_size: int
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Run the model up to decoder layer 0 and keep, per batch, its hidden states and kwargs."""
    _, layers = decoder_layers(model)
    first = layers[0]
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    class Catcher(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Some models read attributes of layer 0 (e.g. attention_type) before calling it.
            self.__dict__.update({k: v for k, v in first.__dict__.items() if not k.startswith("_")})

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            hidden.append(hidden_states.detach())
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
            kwargs["use_cache"] = False
            kwargs_list.append(kwargs)
            raise _Captured

    layers[0] = Catcher()
    try:
        for start in range(0, calibration.shape[0], batch_size):
            ids = calibration[start : start + batch_size].to(device)
            with contextlib.suppress(_Captured):
                model(input_ids=ids, use_cache=False)
    finally:
        layers[0] = first
    return hidden, kwargs_list


def _infer_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def run_layer_sequential(
    model: nn.Module,
    calibration: torch.Tensor,
    compressor: LayerCompressor,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    on_layer: LayerCallback | None = None,
) -> list[LinearReport]:
    """Compress every decoder layer in order; only the current layer lives on ``device``.

    Everything but the decoder layers (embeddings, rotary tables, final norm, head) is moved to
    ``device`` only while the layer-0 inputs are captured. The model ends where it started.
    """
    run = _SequentialRun.start(model, device)
    try:
        exec_device, prefix, layers, layer_home = run.device, run.prefix, run.layers, run.layer_home
        ((hidden, kwargs_list),) = run.capture(model, [(calibration, batch_size)])

        reports: list[LinearReport] = []
        total = len(layers)
        for index, layer in enumerate(layers):
            started = time.perf_counter()
            layer.to(exec_device)
            layer_kwargs = [_move_kwargs(kw, exec_device) for kw in kwargs_list]

            def run_layer(
                layer: nn.Module = layer,
                inputs: list[torch.Tensor] = hidden,
                layer_kwargs: list[dict[str, Any]] = layer_kwargs,
            ) -> None:
                for states, kwargs in zip(inputs, layer_kwargs, strict=True):
                    layer(states, **kwargs)

            layer_reports = compressor.compress_layer(index, f"{prefix}.{index}", layer, run_layer)
            reports.extend(layer_reports)
            hidden = [
                _first_output(layer(states, **kwargs))
                for states, kwargs in zip(hidden, layer_kwargs, strict=True)
            ]
            layer.to(layer_home[index])
            if on_layer is not None:
                on_layer(
                    LayerEvent(
                        index=index,
                        total=total,
                        seconds=time.perf_counter() - started,
                        reports=layer_reports,
                        peak_memory_bytes=_peak_memory(exec_device),
                    )
                )
    finally:
        run.finish(model)
    return reports


@dataclass
class _SequentialRun:
    """What both layer-by-layer drivers set up: where to compute, the decoder layers and where
    each lives, and the model's training flag to restore at the end."""

    device: torch.device
    home: torch.device
    prefix: str
    layers: nn.ModuleList
    layer_home: list[torch.device]
    was_training: bool
    input_groups: tuple[tuple[str, ...], ...]

    @classmethod
    def start(cls, model: nn.Module, device: str | torch.device | None) -> _SequentialRun:
        home = _infer_device(model)
        arch = architecture_of(model)
        prefix, layers = arch.decoder_layers(model)
        run = cls(
            device=torch.device(device) if device is not None else home,
            home=home,
            prefix=prefix,
            layers=layers,
            layer_home=[next(layer.parameters()).device for layer in layers],
            was_training=model.training,
            input_groups=arch.input_groups,
        )
        model.eval()
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(run.device)
        return run

    def capture(
        self, model: nn.Module, batches: list[tuple[torch.Tensor, int]]
    ) -> list[tuple[list[torch.Tensor], list[dict[str, Any]]]]:
        """Layer-0 inputs of each ``(calibration, batch_size)``, with everything but the decoder
        layers on the compute device only meanwhile."""
        if self.device != self.home:
            _to_device_except_layers(model, self.layers, self.device)
        try:
            return [
                capture_layer_inputs(model, calibration, self.device, batch_size)
                for calibration, batch_size in batches
            ]
        finally:
            if self.device != self.home:
                _to_device_except_layers(model, self.layers, self.home)

    def finish(self, model: nn.Module) -> None:
        """Put every layer back where it lived and restore the training flag; the drivers call
        this in a ``finally``, so a layer that fails leaves the model as usable as it was."""
        for layer, home in zip(self.layers, self.layer_home, strict=True):
            layer.to(home)
        if self.was_training:
            model.train()


def _to_device_except_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    layer_ids |= {id(b) for layer in layers for b in layer.buffers()}
    for module in model.modules():
        for _name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in layer_ids:
                param.data = param.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            if id(buf) not in layer_ids:
                module._buffers[name] = buf.to(device)


#: glibc mallopt parameters (malloc.h) and their defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def _reuse_freed_memory() -> Iterator[None]:
    """Keep freed activations in the heap for the next allocation, then give them back.

    glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on free, so each
    activation-sized tensor of a whole-calibration-set pass is paid again in page faults: about
    a third of the CPU time of a layer's bfloat16 forward on 64 x 512 tokens (500,000 faults;
    with this, 25,000 and 2 % system time). Elsewhere (no glibc) it does nothing.
    """
    libc = None
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6")
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 40)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def _autocast(device: torch.device, dtype: torch.dtype | None, model_dtype: torch.dtype) -> Any:
    if dtype is None or dtype == model_dtype:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _one_pass(
    layer: nn.Module,
    index: int,
    prefix: str,
    compressor: LinearGroupCompressor,
    clock: PhaseClock,
    cast: Any,
    inputs: tuple[torch.Tensor, dict[str, Any]],
    input_groups: tuple[tuple[str, ...], ...],
    float_inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[LinearReport]]:
    """Run ``layer`` once on ``inputs``, compressing each input group of Linears (from the
    architecture adapter; a Linear in none is a group of its own) as it is reached; the layer's
    output and the reports. ``float_inputs``: each Linear's input in the float model
    (``_float_pass``), handed on to the compressor."""
    linears = find_linears(layer)
    group_of = {name: group for group in input_groups for name in group if name in linears}
    # What each Linear of an already compressed group must be fed: the very tensor its group
    # was compressed for. Anything else means the adapter's groups are wrong for this model.
    expected: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    reports: list[LinearReport] = []

    def hook(name: str, x: torch.Tensor) -> None:
        if name in expected:
            if expected.pop(name) is not x:
                raise UnsupportedModel(
                    f"{prefix}.{name} does not read the input of its group "
                    f"{list(group_of[name])}: the architecture adapter's input groups are wrong"
                )
            return
        if name in done:
            return
        group = [n for n in group_of.get(name, (name,)) if n in linears and n not in done]
        done.update(group)
        expected.update({n: x for n in group if n != name})
        members = {n: linears[n] for n in group}
        reports.extend(compressor.compress_group(
            index, prefix, members, x, clock,
            float_inputs=None if float_inputs is None else float_inputs[name]))

    return _run_hooked(layer, linears, hook, cast, inputs), reports


def _run_hooked(
    layer: nn.Module,
    linears: dict[str, nn.Linear],
    hook: Callable[[str, torch.Tensor], None],
    cast: Any,
    inputs: tuple[torch.Tensor, dict[str, Any]],
) -> torch.Tensor:
    """Run ``layer`` on ``inputs`` under ``cast``, calling ``hook(name, input)`` before each of
    ``linears`` computes; the layer's output."""
    handles = [
        linear.register_forward_pre_hook(lambda m, args, name=name: hook(name, args[0]))
        for name, linear in linears.items()
    ]
    try:
        with cast:
            states, kwargs = inputs
            return _first_output(layer(states, **kwargs))
    finally:
        for handle in handles:
            handle.remove()


def _float_pass(
    layer: nn.Module, cast: Any, inputs: tuple[torch.Tensor, dict[str, Any]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run ``layer``, still uncompressed, on the float stream: its output and every Linear's
    input (Linears fed one tensor share it, so a group costs one copy)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, x: torch.Tensor) -> None:
        seen.setdefault(name, x.detach())

    return _run_hooked(layer, find_linears(layer), keep, cast, inputs), seen


@torch.no_grad()
def run_linear_sequential(
    model: nn.Module,
    calibration: torch.Tensor,
    compressor: LinearGroupCompressor,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    on_layer: LayerCallback | None = None,
    float_samples: int = 0,
) -> list[LinearReport]:
    """Compress every decoder layer with one forward pass of all samples per layer.

    The architecture adapter says which Linears of a layer share an input; in the pass, the
    first Linear of each such group to be called hands the group and its input to
    ``compressor`` from a forward pre-hook, before the Linear computes. So every Linear sees
    inputs produced by the compressed Linears before it (errors propagate as at inference) and
    the layer's output, already compressed, feeds the next layer. ``dtype`` (e.g. bfloat16) runs
    the pass under autocast; the residual stream and the compressor's statistics stay as they
    are. Memory: one layer's activations for every calibration token at once.

    ``float_samples`` > 0 also runs each layer, before it is compressed, on the float model's
    hidden states of the first ``float_samples`` calibration samples, and hands the compressor
    every Linear's float-model input for them (``float_inputs``, the same samples as the first
    rows of ``inputs``): a forward pass of that many samples more per layer.
    """
    model_dtype = next(model.parameters()).dtype
    run = _SequentialRun.start(model, device)
    try:
        exec_device, prefix, layers, layer_home = run.device, run.prefix, run.layers, run.layer_home
        samples = calibration.shape[0]
        float_samples = min(float_samples, samples)
        captures = [(calibration, samples)]
        if 0 < float_samples < samples:
            captures.append((calibration[:float_samples], float_samples))
        (hidden_list, kwargs_list), *subset = run.capture(model, captures)
        hidden = hidden_list[0]
        kwargs = kwargs_list[0]
        del hidden_list
        # Layer 0's inputs are the same in both models.
        float_hidden: torch.Tensor | None = None
        float_kwargs = kwargs
        if subset:
            float_hidden, float_kwargs = subset[0][0][0], subset[0][1][0]
        elif float_samples:
            float_hidden = hidden

        reports: list[LinearReport] = []
        clock = PhaseClock()
        reuse = _reuse_freed_memory() if exec_device.type == "cpu" else contextlib.nullcontext()
        with reuse:
            for index, layer in enumerate(layers):
                started = time.perf_counter()
                started_cpu = time.process_time()
                layer.to(exec_device)
                cast = _autocast(exec_device, dtype, model_dtype)
                float_inputs = None
                if float_hidden is not None:
                    with clock("float"):
                        float_hidden, float_inputs = _float_pass(
                            layer, cast, (float_hidden, float_kwargs))
                hidden, layer_reports = _one_pass(
                    layer, index, f"{prefix}.{index}", compressor, clock, cast,
                    (hidden, kwargs), run.input_groups, float_inputs,
                )
                del float_inputs
                reports.extend(layer_reports)
                layer.to(layer_home[index])
                wall, cpu = clock.take()
                wall["forward"] = time.perf_counter() - started - sum(wall.values())
                cpu["forward"] = time.process_time() - started_cpu - sum(cpu.values())
                if on_layer is not None:
                    on_layer(
                        LayerEvent(
                            index=index,
                            total=len(layers),
                            seconds=time.perf_counter() - started,
                            reports=layer_reports,
                            peak_memory_bytes=_peak_memory(exec_device),
                            phases=wall,
                            phases_cpu=cpu,
                        )
                    )
    finally:
        run.finish(model)
    return reports
