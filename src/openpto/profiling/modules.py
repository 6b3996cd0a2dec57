"""Time per kind of module, through ``torch.profiler``.

Forward pre/post hooks open and close a ``record_function`` range named after each module's class
(``LlamaAttention``, ``LlamaMLP``, ``QuantLinear``, ...) around every call; the profiler then
reports the total CPU time and, on CUDA, device time of each range. Ranges nest (an MLP contains
its Linears), so the rows overlap and do not sum to the total; ``share`` is relative to the
whole run's wall time. The hooks add some host overhead, which is why this runs outside the
timed repeats.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

_PREFIX = "module::"


def module_times(
    model: torch.nn.Module, run: Callable[[], object], top: int = 15
) -> list[dict[str, Any]]:
    """Run ``run()`` once under the profiler; rows ``{module, calls, cpu_ms, device_ms, share}``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    open_ranges: dict[int, list[Any]] = {}

    def before(module: torch.nn.Module, args: Any) -> None:
        scope = record_function(_PREFIX + type(module).__name__)
        scope.__enter__()
        open_ranges.setdefault(id(module), []).append(scope)

    def after(module: torch.nn.Module, args: Any, output: Any) -> None:
        stack = open_ranges.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        if module is model:
            continue
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    activities = [ProfilerActivity.CPU]
    if next(model.parameters()).device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    try:
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            run()
            wall = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for event in prof.key_averages():
        if not event.key.startswith(_PREFIX):
            continue
        cpu_ms = event.cpu_time_total / 1e3
        device_us = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0))
        rows.append({
            "module": event.key.removeprefix(_PREFIX),
            "calls": int(event.count),
            "cpu_ms": cpu_ms,
            "device_ms": float(device_us) / 1e3,
            "share": cpu_ms / (wall * 1e3) if wall > 0 else 0.0,
        })
    rows.sort(key=lambda r: r["cpu_ms"], reverse=True)
    return rows[:top]
