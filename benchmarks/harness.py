"""What every benchmark script shares: machine description, lock, timer, model shapes, tables, JSON.

The scripts are run from the repository root as ``python benchmarks/NAME.py``, which puts this
folder on ``sys.path``, so they ``import harness``; importing it also puts the checkout's ``src``
first on the path, so the scripts measure the sources next to them without an install.

- ``machine()``: this machine as ``openpto.hardware.hardware_info()`` sees it (devices, CPU
  flags, versions, available backends), plus the torch thread count and load average.
- ``machine_lock()``: the exclusive lock timed runs hold on a shared machine, the same
  ``flock(2)`` lock that ``flock -x /tmp/openpto-bench.lock COMMAND`` takes.
- ``time_calls`` / ``time_round_robin`` / ``stopwatch``: one wall-clock timer, with warm-up,
  repeats and percentiles, that synchronises CUDA before reading the clock. Kernel benchmarks
  that need device time per call (CUDA events, L2 flushed) use ``device_timer()``, the
  library's event timer in ``openpto.kernels.triton.timing``.
- ``LLAMA3_8B``, ``SMOLLM2_135M``, ``TINY_LLAMA`` and ``linear_shapes``: model shapes, defined once.
- ``markdown_table``: the tables the scripts print (pasted into docs/benchmarks.md).
- ``write_json``: results with the git commit, the command line, the date and the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

#: when this process started: the date every result of the run carries
STARTED = datetime.now(timezone.utc)
LOCK_PATH = os.environ.get("OPT_BENCH_LOCK", "/tmp/openpto-bench.lock")
DEFAULT_MODEL = "smollm2-135m"

# -- model shapes ----------------------------------------------------------------------------------

#: Llama-3-8B's architecture as ``LlamaConfig`` fields. A randomly initialised model of this
#: shape is a valid speed and memory benchmark, never a quality one.
LLAMA3_8B: dict[str, Any] = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
    tie_word_embeddings=False,
)  # fmt: skip
#: the default model's (SmolLM2-135M-Instruct) architecture
SMOLLM2_135M: dict[str, Any] = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
)  # fmt: skip
#: a few-second CPU smoke test of a GPU script's code
TINY_LLAMA: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False,
)  # fmt: skip


def llama3_8b(shrink: int = 1, **overrides: Any) -> dict[str, Any]:
    """Llama-3-8B's fields with every width divided by ``shrink`` (a CPU smoke test of a GPU
    script: heads by at most 4, so the head count stays whole) and ``overrides`` applied."""
    fields = dict(LLAMA3_8B)
    if shrink != 1:
        for key in ("hidden_size", "intermediate_size", "vocab_size"):
            fields[key] //= shrink
        for key in ("num_attention_heads", "num_key_value_heads"):
            fields[key] //= min(shrink, 4)
    return {**fields, **overrides}


def llama_config(fields: dict[str, Any]) -> Any:
    """A transformers ``LlamaConfig`` of ``fields``."""
    from transformers import LlamaConfig

    return LlamaConfig(**fields)


def head_dim(fields: dict[str, Any]) -> int:
    return int(fields["hidden_size"] // fields["num_attention_heads"])


def linear_shapes(fields: dict[str, Any], fused: bool = False) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of one decoder layer's Linears and of the LM head. With
    ``fused``, Q/K/V is one Linear (``qkv``) as fused kernels see it."""
    hidden, inter = fields["hidden_size"], fields["intermediate_size"]
    heads, kv = fields["num_attention_heads"], fields["num_key_value_heads"]
    dim = head_dim(fields)
    shapes = {"q/o": (heads * dim, hidden), "k/v": (kv * dim, hidden)}
    if fused:
        shapes = {"o": (hidden, heads * dim), "qkv": ((heads + 2 * kv) * dim, hidden)}
    return {**shapes, "gate/up": (inter, hidden), "down": (hidden, inter),
            "lm_head": (fields["vocab_size"], hidden)}


# -- the machine -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _hardware() -> dict[str, Any]:
    from openpto.hardware import hardware_info

    info = hardware_info()
    # the backends that can run here, with versions; the reasons of the others are noise here
    info["backends"] = {name: {"version": b["version"], "reason": b["reason"]}
                        for name, b in info["backends"].items() if b["available"]}
    return info


def machine() -> dict[str, Any]:
    """This machine now: ``hardware_info()`` with the available backends, torch's thread count
    and the 1/5/15-minute load average (a shared machine's load inflates wall times)."""
    info = dict(_hardware())
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    for name in ("transformers", "triton"):  # versions of what the measured code ran on
        if name in sys.modules:
            info[name] = getattr(sys.modules[name], "__version__", None)
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """The checkout's commit and whether the tree had uncommitted changes (``None`` outside git)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def command_line() -> str:
    return shlex.join(["python", *sys.argv])


def run_info() -> dict[str, Any]:
    """What a result needs to be reproduced: date, commit, command, machine."""
    return {"date": STARTED.isoformat(timespec="seconds"), **git_state(),
            "command": command_line(), "machine": machine()}


def result_path(name: str) -> Path:
    """The default results file of a script: ``benchmarks/results/NAME.json``."""
    return RESULTS / f"{name}.json"


def write_json(path: Path | str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with ``run`` (``run_info()``) first; returns the path. Called after every
    row by the long scripts, so a run cut short keeps what it measured."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": run_info(), **payload}, indent=2) + "\n")
    return path


@contextlib.contextmanager
def machine_lock(path: str = LOCK_PATH) -> Iterator[list[float]]:
    """Hold the machine's exclusive benchmark lock; yields the load average once it is held.
    Not re-entrant: a process already running under ``flock -x`` on the same file must not take
    it again (it would wait for itself)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield [round(x, 2) for x in os.getloadavg()]
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- timing ----------------------------------------------------------------------------------------


def synchronize(device: Any = None) -> None:
    """Wait for queued CUDA work, so the host clock measures the device's work too."""
    if device is None:
        return
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``values``; NaN when there are none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass(frozen=True)
class Timing:
    """Seconds of every timed call, in the order they ran."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    def percentile(self, q: float) -> float:
        return percentile(self.seconds, q)

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.min, "p10_s": self.percentile(0.1),
                "p90_s": self.percentile(0.9), "calls": len(self.seconds)}


def time_calls(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 3, device: Any = None,
               min_seconds: float = 0.0, max_calls: int | None = None) -> Timing:
    """``warmup`` untimed calls, then timed calls until there are ``repeats`` and they add up to
    ``min_seconds`` (at most ``max_calls``). Each call is bracketed by ``synchronize(device)``."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    while (len(samples) < repeats or sum(samples) < min_seconds) and (
            max_calls is None or len(samples) < max_calls):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return Timing(tuple(samples))


def time_round_robin(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 3,
                     device: Any = None) -> dict[str, Timing]:
    """Each function warmed up, then timed once per round for ``repeats`` rounds, so a change in
    a shared machine's load hits every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_calls(fn, repeats=1, warmup=0, device=device).seconds[0])
    return {name: Timing(tuple(t)) for name, t in times.items()}


@dataclass
class Elapsed:
    """Filled in when the ``stopwatch`` block ends: wall and process CPU seconds."""

    wall: float = 0.0
    cpu: float = 0.0
    load_average: list[float] = field(default_factory=list)


@contextlib.contextmanager
def stopwatch(device: Any = None) -> Iterator[Elapsed]:
    """Wall and CPU time of one block of work (synchronised at both ends), with the load average
    at its start."""
    elapsed = Elapsed(load_average=[round(x, 2) for x in os.getloadavg()])
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield elapsed
    finally:
        synchronize(device)
        elapsed.wall, elapsed.cpu = time.perf_counter() - wall, time.process_time() - cpu


def timed_call(fn: Callable[[], Any], device: Any = None) -> tuple[Any, float]:
    """``fn()``'s value and its wall seconds, synchronised."""
    with stopwatch(device) as elapsed:
        value = fn()
    return value, elapsed.wall


def copy_bandwidth(device: Any, nbytes: int = 2**30, repeats: int = 20) -> float:
    """(bytes read + bytes written) / time of a device-to-device copy, median of ``repeats``
    synchronised copies after two warm-up copies: the bandwidth floor's ceiling."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_calls(lambda: dst.copy_(src), repeats=repeats, warmup=2, device=device)
    return 2 * nbytes / timing.median


def device_timer(**kwargs: Any) -> Any:
    """CUDA-event device time per call, L2 flushed by reading 256 MB before each call, the
    host's launch cost hidden behind a spin (``openpto.kernels.triton.timing.Timer``)."""
    from openpto.kernels.triton.timing import Timer

    return Timer(**kwargs)


# -- output ----------------------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; cells are printed with ``str`` (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
