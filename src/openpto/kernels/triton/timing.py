"""Honest GPU timing for the kernel benchmarks (torch only; no triton import).

- Device time: CUDA events around the call, median of many calls. Before each call, L2 is flushed
  by READING a 256 MB buffer (a flush by writing leaves dirty lines whose write-back lands inside
  the next timed call), then a short ``torch.cuda._sleep`` spin is queued so that the host's launch
  cost happens while the GPU spins and stays out of the measured interval.
- Host time: wall-clock seconds per call to enqueue it, measured separately without syncing.
- Ceiling: a device-to-device copy of 1 GiB, counting bytes read plus bytes written.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    device_s: float  # median device seconds per call
    spread: float  # (p90 - p10) / median of the device times
    host_s: float  # host seconds to enqueue one call

    def to_dict(self) -> dict[str, float]:
        return {
            "device_us": self.device_s * 1e6,
            "spread": self.spread,
            "host_us": self.host_s * 1e6,
        }


class Timer:
    def __init__(self, device: torch.device | str = "cuda", flush_mb: int = 256) -> None:
        self.device = torch.device(device)
        self.flush_buf = torch.ones(flush_mb * 2**20 // 4, dtype=torch.float32, device=self.device)
        self.sink = torch.empty((), dtype=torch.float32, device=self.device)

    def flush_l2(self) -> None:
        torch.sum(self.flush_buf, dim=0, out=self.sink)

    def device_time(
        self, fn: Callable[[], object], reps: int = 50, warmup: int = 3, spin_cycles: int = 200_000
    ) -> tuple[float, float]:
        for _ in range(warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush_l2()
            torch.cuda._sleep(spin_cycles)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        times = sorted(s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends, strict=True))
        med = statistics.median(times)
        p10, p90 = times[len(times) // 10], times[(len(times) * 9) // 10]
        return med, (p90 - p10) / med if med > 0 else 0.0

    def host_time(self, fn: Callable[[], object], reps: int = 100) -> float:
        fn()
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize(self.device)
        return (t1 - t0) / reps

    def time(self, fn: Callable[[], object], reps: int = 50) -> Timing:
        dev, spread = self.device_time(fn, reps=reps)
        return Timing(dev, spread, self.host_time(fn, reps=max(20, reps)))


def copy_bandwidth(device: torch.device | str = "cuda", gib: float = 1.0, reps: int = 10) -> float:
    """Bytes per second of a device-to-device copy, (read + written) / time, median of ``reps``."""
    n = int(gib * 2**30) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize(device)
        times.append(a.elapsed_time(b) * 1e-3)
    return 2 * n * 4 / statistics.median(times)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere (an unwritten element) gives inf."""
    o, r = out.double(), ref.double()
    if not bool(torch.isfinite(o).all()):
        return float("inf")
    return float((o - r).norm() / r.norm())
