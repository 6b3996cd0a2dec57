"""Packed CUDA int4 paths against the dequantized reference, judged against a float32 reference.

A bf16 model's logits differ from the same model's float32 logits by bf16 rounding alone, and
over 32 random layers that difference is large (several percent of the largest logit). So "the
same logits within bf16 tolerance" is measured here as: every packed kernel's distance from the
float32 dequantized model is at most ``--tolerance`` times the distance of the bf16 dequantized
model (the unpacked reference a user would otherwise run) from it.

The model is a randomly initialised Llama-3-8B-shaped ``LlamaForCausalLM`` (speed and numerics,
never quality) whose decoder Linears are rounded to int4 (RTN, asymmetric, group 128) and replaced
by their dequantized weights, so all variants compute with the same codes:

- ``float32 dequantized``: the reference;
- ``bf16 dequantized``: the same weights in bf16, computed with ``F.linear`` (cuBLAS);
- one row per packed kernel (``QuantLinear`` over ``triton-w4a16`` and ``tinygemm-int4-cuda``).

    PYTHONPATH=src python benchmarks/gpu_packed_logits.py --layers 32 --json $OUT/packed_logits.json
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import harness
import torch
from torch import nn


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (got - ref).abs()
    return {
        "max_abs_diff_over_max_logit": diff.max().item() / ref.abs().max().item(),
        "relative_l2_error": (diff.norm() / ref.norm()).item(),
        "argmax_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--shrink", type=int, default=1, help="divide widths (CPU smoke test)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=2.0)
    parser.add_argument("--kernels", default="triton-w4a16,tinygemm-int4-cuda")
    parser.add_argument("--json", default=str(harness.result_path("gpu_packed_logits")))
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    from openpto.core.quant.tensor import quantize_weight
    from openpto.kernels import model_kernel_summary, swap_to_packed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = args.shrink
    config = harness.llama_config(harness.llama3_8b(s, num_hidden_layers=args.layers))
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()  # float32
    quantized = {}
    for name, module in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(module, nn.Linear):
            qw = quantize_weight(module.weight.data, 4, args.group_size, symmetric=False)
            module.weight.data = qw.dequantize(torch.float32)
            quantized[name] = qw
    ids = torch.randint(
        0, config.vocab_size, (2, args.tokens), generator=torch.Generator().manual_seed(1)
    ).to(device)
    reference = model(ids).logits.float()
    model.to(torch.bfloat16)
    rows: dict[str, dict[str, Any]] = {
        "bf16 dequantized": compare(model(ids).logits.float(), reference)
    }
    originals = {name: model.get_submodule(name) for name in quantized}
    for kernel in [k for k in args.kernels.split(",") if k]:
        try:
            summary = swap_to_packed(model, quantized, kernel=kernel, dtype=torch.bfloat16)
        except Exception as exc:  # a kernel this device lacks: report it, keep going
            rows[kernel] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        rows[kernel] = {**compare(model(ids).logits.float(), reference), "kernels": summary}
        for name, linear in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
        assert model_kernel_summary(model) == {"dense": len(originals) + 1}
    bound = rows["bf16 dequantized"]["relative_l2_error"] * args.tolerance
    for name, row in rows.items():
        if "relative_l2_error" in row and name != "bf16 dequantized":
            row["within_bf16_tolerance"] = row["relative_l2_error"] <= bound
    report = {
        "device": str(device),
        "model": f"random Llama-3-8B shape / {s}, {args.layers} decoder layers",
        "quantization": f"RTN int4 asymmetric, group {args.group_size}",
        "tolerance": f"packed relative L2 error <= {args.tolerance} x bf16's",
        "seconds": time.perf_counter() - started,
        "results": rows,
    }
    print(harness.markdown_table(
        ["logits of", "max abs diff / max logit", "relative L2", "argmax agreement", "ok"],
        ([name, row["error"], "", "", ""] if "error" in row
         else [name, f"{row['max_abs_diff_over_max_logit']:.4f}",
               f"{row['relative_l2_error']:.4f}", f"{row['argmax_agreement']:.3f}",
               row.get("within_bf16_tolerance", "-")]
         for name, row in rows.items())))
    harness.write_json(args.json, report)


if __name__ == "__main__":
    main()
