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
import os
from pathlib import Path

import harness
import torch
from torch import nn

from openpto.core.quant.tensor import quantize_weight
from openpto.kernels import QuantLinear

_SHAPES = harness.linear_shapes(harness.SMOLLM2_135M)
SHAPES = [_SHAPES[name][::-1] for name in ("q/o", "gate/up", "down", "lm_head")]  # (in, out)
TOKENS = [1, 128]


def resident_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


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
                timing = harness.time_calls(lambda m=module, xi=xi: m(xi), repeats=5, warmup=3,
                                            min_seconds=min_seconds, max_calls=max_calls)
                seconds, best = timing.median, timing.min
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
    return harness.markdown_table(
        ["shape in x out", "tokens", "variant", "kernel", "us/call (median)", "min", "vs fp32",
         "resident MiB"],
        ([r["shape"], r["tokens"], r["variant"], r["kernel"], r["microseconds"],
          r["min_microseconds"], f"{r['speedup_vs_fp32']}x",
          f"{int(r['resident_bytes']) / 2**20:.2f}"]  # type: ignore[call-overload]
         for r in rows))


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
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "timing": "wall time per call (median and min) after 3 warm-up calls, one process",
    }
    if args.json is not None:
        harness.write_json(args.json, {"meta": meta, "rows": rows})
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
