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
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from openpto.core.sparsity import layer_mask, nm_mask

SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576),
          "gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536)}
TOKENS = (1, 16, 128, 512)


def interleaved_us(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    """Fastest microseconds per call of each function, timed round-robin. On a shared machine a
    call that spans a preemption is slower by the time slice (milliseconds); the minimum is the
    uninterrupted cost, and round-robin lets the load hit every variant alike."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e6)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("sparsity_cpu.json"))
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
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "dtype": "float32",
        "timing": "perf_counter, minimum after 3 warm-up calls, variants round-robin", "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
