"""``profile_generation``: TTFT, TPOT, inter-token latency, throughput and peak memory.

Protocol (stored with every result):

- The prompt is ``batch`` rows of ``prompt_len`` random token ids (fixed seed, no padding), the
  generation is greedy with end-of-sequence ignored, so every run produces exactly ``gen_len``
  tokens per row and runs are comparable across models.
- ``warmup`` untimed runs first (allocator, kernels, caches), then ``repeats`` timed runs.
- Each token is timed when its id reaches the host (``.item()``/``.tolist()``), which waits for
  the device, so CUDA timings include all queued work (``synchronized: true``).
- TTFT is the time from the start of a run to the first token (prefill + one sampling step);
  ``prefill_tokens_per_second = batch * prompt_len / TTFT``; TPOT is the mean time between later
  tokens; ``decode_tokens_per_second = batch * (gen_len - 1) / (time after the first token)``;
  inter-token latency percentiles pool the steps of all timed runs. Reported values are medians
  over the repeats, with min and max as the spread.
- Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (allocator peak, reset before the timed
  runs); on CPU the largest resident set size sampled after every token (psutil), and the
  process's lifetime peak from ``getrusage`` alongside it.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch

from openpto.core.generate import generate_batch_stream, generate_stream, model_device
from openpto.core.sampling import SamplingParams
from openpto.core.static_decode import DecodeMode
from openpto.errors import UsageError


@dataclasses.dataclass(frozen=True)
class ProfileResult:
    ttft_ms: float
    tpot_ms: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    itl_ms: dict[str, float]
    peak_memory_bytes: int
    memory: dict[str, Any]
    spread: dict[str, list[float]]
    setup: dict[str, Any]
    module_times: list[dict[str, Any]] | None = None
    #: set by the recorded ``profile`` workflow: the model's name and the run
    model: str | None = None
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "prefill_tokens_per_second": self.prefill_tokens_per_second,
            "decode_tokens_per_second": self.decode_tokens_per_second,
            "itl_p50_ms": self.itl_ms["p50"],
            "itl_p90_ms": self.itl_ms["p90"],
            "itl_p99_ms": self.itl_ms["p99"],
            "peak_memory_bytes": self.peak_memory_bytes,
            "device": self.setup["device"],
            "dtype": self.setup["dtype"],
            "kernels": self.setup["kernels"],
            "memory": self.memory,
            "spread": self.spread,
            "setup": self.setup,
        }
        if self.module_times is not None:
            out["module_times"] = self.module_times
        if self.model is not None:
            out = {"model": self.model, **out}
        if self.run_id is not None:
            out["run_id"] = self.run_id
        return out


def kernel_summary(model: torch.nn.Module) -> dict[str, int]:
    """How many Linear-like modules run on each kernel (a packed module's ``kernel_name``;
    a plain ``nn.Linear`` counts as ``dense-<dtype>``)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        name = getattr(module, "kernel_name", None)
        if isinstance(name, str):
            key = name
        elif isinstance(module, torch.nn.Linear):
            key = f"dense-{str(module.weight.dtype).removeprefix('torch.')}"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def memory_probe(device: torch.device | str) -> Callable[[], int]:
    """A cheap reading of the memory in use, taken after each token (``StepRecord.memory_bytes``):
    on CUDA the allocator's current allocation (a host-side counter, no sync), elsewhere the
    process's resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: int(torch.cuda.memory_allocated(device))
    import psutil

    process = psutil.Process()
    return lambda: int(process.memory_info().rss)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


class _MemoryWatch:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss_peak = 0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        import psutil

        self.process = psutil.Process()

    def sample(self) -> int:
        """The memory probe of the timed runs' records (``StepRecord.memory_bytes``)."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        rss = int(self.process.memory_info().rss)
        self.rss_peak = max(self.rss_peak, rss)
        return rss

    def report(self) -> tuple[int, dict[str, Any]]:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports kilobytes, macOS bytes.
        lifetime = int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024
        info: dict[str, Any] = {"process_peak_rss_bytes": lifetime}
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
            info.update(kind="cuda_max_memory_allocated", cuda_peak_allocated_bytes=peak,
                        cuda_peak_reserved_bytes=int(torch.cuda.max_memory_reserved(self.device)))
            return peak, info
        info.update(kind="cpu_rss_peak_sampled_per_token", rss_peak_bytes=self.rss_peak)
        return self.rss_peak, info


def _one_run(
    model: torch.nn.Module, prompts: torch.Tensor, gen_len: int, watch: _MemoryWatch | None,
    decode: DecodeMode = "auto",
) -> tuple[float, list[float]]:
    """TTFT and the step times of one greedy generation of ``gen_len`` tokens per row."""
    params = SamplingParams(max_tokens=gen_len)
    steps: list[float] = []
    ttft = 0.0
    if prompts.shape[0] == 1:
        probe = watch.sample if watch is not None else None
        for record in generate_stream(model, None, prompts[0], params, ignore_eos=True,
                                      decode=decode, memory=probe):
            steps.append(record.step_s)
            ttft = record.ttft_s
    else:
        rows = [row for row in prompts]
        for step in generate_batch_stream(model, None, rows, params, ignore_eos=True):
            first = step[0]
            if first is not None:
                steps.append(first.step_s)
                ttft = first.ttft_s
            if watch is not None:
                watch.sample()
    return ttft, steps


def profile_generation(
    model: torch.nn.Module,
    prompt_len: int = 128,
    gen_len: int = 128,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    modules: bool = False,
    decode: DecodeMode = "auto",
) -> ProfileResult:
    """Profile greedy generation on ``model`` (see the module docstring for the protocol).

    ``decode`` is the batch-1 decoder (``core.static_decode``; "auto" replays a CUDA graph on
    CUDA, as ``opt generate`` and the server's lone requests do); batches decode eagerly.

    ``modules=True`` adds one extra run under ``torch.profiler`` and reports the time spent in
    each kind of module (``module_times``); that run is not part of the timed repeats.
    """
    for name, value, least in (("prompt_len", prompt_len, 1), ("gen_len", gen_len, 2),
                               ("batch", batch, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if value < least:
            raise UsageError(f"{name} must be >= {least}, got {value}")
    device = model_device(model)
    head: Any = model.get_output_embeddings()  # type: ignore[operator]
    vocab = int(head.weight.shape[0])
    gen = torch.Generator().manual_seed(seed)
    # Avoid the first few ids, which are special tokens in most vocabularies.
    low = min(8, vocab - 1)
    prompts = torch.randint(low, vocab, (batch, prompt_len), generator=gen).to(device)
    for _ in range(warmup):
        _one_run(model, prompts, gen_len, None, decode)
    watch = _MemoryWatch(device)
    ttfts: list[float] = []
    tpots: list[float] = []
    decode_rates: list[float] = []
    all_steps: list[float] = []
    for _ in range(repeats):
        ttft, steps = _one_run(model, prompts, gen_len, watch, decode)
        later = steps[1:]
        ttfts.append(ttft)
        tpots.append(sum(later) / len(later))
        decode_rates.append(batch * len(later) / sum(later))
        all_steps.extend(later)
    peak, memory = watch.report()
    prefill_rates = [batch * prompt_len / t for t in ttfts]
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    setup = {
        "device": str(device), "dtype": dtype, "kernels": kernel_summary(model),
        "prompt_len": prompt_len, "gen_len": gen_len, "batch": batch, "repeats": repeats,
        "warmup": warmup, "seed": seed, "synchronized": True, "statistic": "median",
        "prompt": "random token ids", "decoding": "greedy, eos ignored", "decode": decode,
        "torch_threads": torch.get_num_threads(),
    }
    spread = {
        "ttft_ms": [min(ttfts) * 1e3, max(ttfts) * 1e3],
        "tpot_ms": [min(tpots) * 1e3, max(tpots) * 1e3],
        "decode_tokens_per_second": [min(decode_rates), max(decode_rates)],
        "prefill_tokens_per_second": [min(prefill_rates), max(prefill_rates)],
    }
    breakdown = None
    if modules:
        from openpto.profiling.modules import module_times

        breakdown = module_times(model, lambda: _one_run(model, prompts, gen_len, None, decode))
    return ProfileResult(
        ttft_ms=statistics.median(ttfts) * 1e3,
        tpot_ms=statistics.median(tpots) * 1e3,
        prefill_tokens_per_second=statistics.median(prefill_rates),
        decode_tokens_per_second=statistics.median(decode_rates),
        itl_ms={f"p{q}": percentile(all_steps, q) * 1e3 for q in (50, 90, 99)},
        peak_memory_bytes=peak,
        memory=memory,
        spread=spread,
        setup=setup,
        module_times=breakdown,
    )
