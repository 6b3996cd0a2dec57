"""What 50% and 2:4 sparsity buy on a CPU: dense vs masked-dense vs torch sparse CSR matmul.

At the default model's Linear shapes (SmolLM2-135M: 576x576, 1536x576, 576x1536, plus the
192x576 k/v projections) and 1, 16, 128 and 512 tokens, float32, it times ``x @ W^T`` for:
- ``dense``: the unpruned weight (``F.linear``);
- ``masked``: the same call on a 2:4-pruned weight (zeros stored densely, as a sparse artifact
  loads) — the zeros are multiplied like any other number;
- ``csr 50%`` / ``csr 90%``: ``torch.sparse.mm`` on a CSR copy of an unstructured 50% / 90%
  pruned weight (torch's only CPU sparse matmul; there is no CPU 2:4 kernel).
Minimum of ``--repeats`` calls after warm-up, the variants timed round-robin, on the threads
torch is given (``--threads``).

Usage: python benchmarks/sparsity_cpu.py [--threads 1] [--out sparsity_cpu.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import harness
import torch
import torch.nn.functional as F

from openpto.core.sparsity import layer_mask, nm_mask

SHAPES = {f"{name} {out}x{width}": (out, width)
          for name, (out, width) in harness.linear_shapes(harness.SMOLLM2_135M).items()
          if name != "lm_head"}
TOKENS = (1, 16, 128, 512)


def interleaved_us(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Fastest microseconds per call of each function, timed round-robin. On a shared machine a
    call that spans a preemption is slower by the time slice (milliseconds); the minimum is the
    uninterrupted cost, and round-robin lets the load hit every variant alike."""
    times = harness.time_round_robin(fns, repeats=repeats, warmup=3)
    return {name: timing.min * 1e6 for name, timing in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=harness.result_path("sparsity_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    header = f"{'shape':18s} {'tokens':>6s}" + "".join(
        f" {c:>9s}" for c in ("dense", "masked", "csr50", "csr90"))
    print(header + "   (us per call; ratios are dense / variant)")
    for name, (out, width) in SHAPES.items():
        w = torch.randn(out, width)
        masked = w * nm_mask(w.abs(), 2, 4)
        csr50 = (w * layer_mask(w.abs(), 0.5)).to_sparse_csr()
        csr90 = (w * layer_mask(w.abs(), 0.9)).to_sparse_csr()
        for tokens in TOKENS:
            x = torch.randn(tokens, width)
            xt = x.t().contiguous()
            times = interleaved_us({
                "dense": lambda w=w, x=x: F.linear(x, w),
                "masked_2_4": lambda m=masked, x=x: F.linear(x, m),
                "csr_50": lambda c=csr50, xt=xt: torch.sparse.mm(c, xt),
                "csr_90": lambda c=csr90, xt=xt: torch.sparse.mm(c, xt),
            }, args.repeats)
            row = {"shape": name, "tokens": tokens, **{f"{k}_us": v for k, v in times.items()},
                   **{f"speedup_{k}": times["dense"] / v for k, v in times.items() if k != "dense"}}
            rows.append(row)
            print(f"{name:18s} {tokens:6d} {times['dense']:9.1f} {times['masked_2_4']:9.1f} "
                  f"{times['csr_50']:9.1f} {times['csr_90']:9.1f}   "
                  f"x{row['speedup_masked_2_4']:.2f} x{row['speedup_csr_50']:.2f} "
                  f"x{row['speedup_csr_90']:.2f}", flush=True)
    result = {
        "threads": args.threads, "dtype": "float32",
        "timing": "perf_counter, minimum after 3 warm-up calls, variants round-robin", "rows": rows,
    }
    harness.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
