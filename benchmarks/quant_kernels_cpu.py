"""CPU matmul time and resident bytes of packed QuantLinear kernels vs dense nn.Linear.

Shapes are the default model's (SmolLM2-135M) Linears, in -> out: 576->576 (q/o), 576->1536
(gate/up), 1536->576 (down), 576->49152 (lm_head), for 1 token (decode) and 128 tokens (prefill).
Weights are random (speed does not depend on values); each variant is timed in the same process,
median of repeated calls after warm-up, and labelled with the kernel that actually ran.

    .venv/bin/python benchmarks/quant_kernels_cpu.py --threads 1 \
        --json benchmarks/results/quant_kernels_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from openpto.core.quant.tensor import quantize_weight  # noqa: E402
from openpto.kernels import QuantLinear  # noqa: E402

SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 49152)]
TOKENS = [1, 128]


def resident_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def time_call(fn: Callable[[], object], min_seconds: float, max_calls: int) -> tuple[float, float]:
    """Median and minimum seconds per call, after warm-up."""
    for _ in range(3):
        fn()
    samples = []
    spent = 0.0
    calls = 0
    while (spent < min_seconds or len(samples) < 5) and calls < max_calls:
        started = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - started
        samples.append(elapsed)
        spent += elapsed
        calls += 1
    return statistics.median(samples), min(samples)


def variants(w: torch.Tensor) -> list[tuple[str, nn.Module, torch.dtype]]:
    out_f, in_f = w.shape
    dense32 = nn.Linear(in_f, out_f, bias=False)
    dense32.weight.data = w.clone()
    dense16 = nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    dense16.weight.data = w.to(torch.bfloat16)
    int8 = quantize_weight(w, 8, None, True)
    int4 = quantize_weight(w, 4, 64, False)
    return [
        ("float32 nn.Linear", dense32, torch.float32),
        ("bfloat16 nn.Linear", dense16, torch.bfloat16),
        ("int8 per-channel, fp32 act", QuantLinear(int8, dtype=torch.float32), torch.float32),
        ("int8 per-channel, bf16 act", QuantLinear(int8, dtype=torch.bfloat16), torch.bfloat16),
        ("int4 g64 asym, fp32 act", QuantLinear(int4, dtype=torch.float32), torch.float32),
        ("int4 g64 asym, bf16 act", QuantLinear(int4, dtype=torch.bfloat16), torch.bfloat16),
        (
            "int4 g64 asym, fp32 act",
            QuantLinear(int4, dtype=torch.float32, kernel="dequantized-reference"),
            torch.float32,
        ),
    ]


@torch.no_grad()
def run(min_seconds: float, max_calls: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for in_f, out_f in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(out_f, in_f) * 0.02
        built = variants(w)
        for tokens in TOKENS:
            x = torch.randn(tokens, in_f)
            base = None
            for label, module, dtype in built:
                xi = x.to(dtype)
                seconds, best = time_call(lambda m=module, xi=xi: m(xi), min_seconds, max_calls)
                base = seconds if base is None else base
                kernel = module.kernel_name if isinstance(module, QuantLinear) else "dense"
                rows.append(
                    {
                        "shape": f"{in_f}x{out_f}",
                        "tokens": tokens,
                        "variant": label,
                        "kernel": kernel,
                        "microseconds": round(seconds * 1e6, 1),
                        "min_microseconds": round(best * 1e6, 1),
                        "speedup_vs_fp32": round(base / seconds, 2),
                        "resident_bytes": resident_bytes(module),
                    }
                )
                print(
                    f"{in_f:>5}x{out_f:<6} {tokens:>4}  {label:<28} {kernel:<22} "
                    f"{seconds * 1e6:>10.1f} us  {base / seconds:>5.2f}x  "
                    f"{resident_bytes(module) / 2**20:>7.2f} MiB",
                    flush=True,
                )
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| shape in x out | tokens | variant | kernel | us/call (median) | min | vs fp32 "
        "| resident MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mib = int(r["resident_bytes"]) / 2**20  # type: ignore[call-overload]
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['variant']} | {r['kernel']} | "
            f"{r['microseconds']} | {r['min_microseconds']} | {r['speedup_vs_fp32']}x | {mib:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timing budget per cell")
    parser.add_argument("--max-calls", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = run(args.min_seconds, args.max_calls)
    print()
    print(markdown(rows))
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "timing": "wall time per call (median and min) after 3 warm-up calls, one process",
        "command": " ".join(sys.argv),
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
