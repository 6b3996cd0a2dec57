"""GPTQ of a randomly initialised Llama-3-8B-shaped model on one GPU, layer by layer, and the
packed CUDA path (tinygemm) against the dequantized reference.

The model lives on the CPU in bfloat16; the calibration driver moves one decoder layer at a time
to the GPU, so peak GPU memory is about one layer plus the activations. Random weights make this a
speed and memory benchmark, never a quality one. Afterwards the model moves to the GPU and its
Linears are swapped for ``QuantLinear`` (tinygemm int4); logits on a short prompt are compared
with those of the same model computing with the dequantized weights.

    python3 benchmarks/quant_gpu_llama8b.py --layers 32 --json $OUT/quant_gpu_llama8b.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import harness
import torch


def build_model(layers: int, hidden: int, intermediate: int, vocab: int):  # type: ignore[no-untyped-def]
    """Llama-3-8B's shape with these widths (head dim 128, 4 query heads per KV head)."""
    from transformers import LlamaForCausalLM

    config = harness.llama_config(harness.llama3_8b(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 128, 1), num_key_value_heads=max(hidden // 512, 1),
        vocab_size=vocab,
    ))
    torch.manual_seed(0)
    init = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(init):  # random init is much faster on the GPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.to("cpu").eval()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape = harness.LLAMA3_8B
    parser.add_argument("--layers", type=int, default=shape["num_hidden_layers"])
    parser.add_argument("--hidden", type=int, default=shape["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=shape["intermediate_size"])
    parser.add_argument("--vocab", type=int, default=shape["vocab_size"])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    parser.add_argument("--float-targets", action="store_true",
                        help="GPTQ fitted to the float model's outputs (GPTQConfig.float_targets)")
    parser.add_argument("--kernels", default="auto,tinygemm-int4-cuda,dequantized-reference")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from openpto.api import quantize_
    from openpto.core.quant import GPTQConfig, RTNConfig
    from openpto.kernels import swap_to_packed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with harness.stopwatch() as build:
        model = build_model(args.layers, args.hidden, args.intermediate, args.vocab)
    print(f"built in {build.wall:.1f}s", flush=True)
    calib = torch.randint(
        0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    events = []

    def on_layer(event) -> None:  # type: ignore[no-untyped-def]
        events.append(event)
        peak = (event.peak_memory_bytes or 0) / 2**30
        print(
            f"layer {event.index + 1}/{event.total}: {event.seconds:.2f}s, peak {peak:.2f} GiB",
            flush=True,
        )

    config = (
        GPTQConfig(bits=4, group_size=args.group_size, float_targets=args.float_targets)
        if args.method == "gptq"
        else RTNConfig(bits=4, group_size=args.group_size, symmetric=False)
    )
    with harness.stopwatch() as quantization:
        result = quantize_(model, config, calib, device=device, on_layer=on_layer)
    total = quantization.wall
    layer_seconds = [e.seconds for e in events]
    phases: dict[str, float] = {}
    for event in events:
        for phase, seconds in (event.phases or {}).items():
            phases[phase] = phases.get(phase, 0.0) + seconds
    # Which Hessians needed float32 products (bfloat16 ones that would not factor).
    products: dict[str, int] = {}
    for report in result.reports:
        kind = str(report.extra.get("hessian_products", "n/a"))
        products[kind] = products.get(kind, 0) + 1
    peak = max((e.peak_memory_bytes or 0) for e in events)
    if device == "cuda":
        torch.cuda.empty_cache()

    # Packed CUDA paths vs the dequantized reference, same codes. "exact" is the model computing
    # in float32 with float32 dequantized weights; "bf16 reference" is the bfloat16 model whose
    # weights are the dequantized values rounded to bfloat16 (what fake quantization gives).
    quantized = result.quantized_weights()
    prompt = torch.randint(0, args.vocab, (1, 64), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    exact_model = copy.deepcopy(model).float()
    for name, qw in quantized.items():
        exact_model.get_submodule(name).weight.data = qw.dequantize(torch.float32)
    exact = exact_model.to(device)(prompt).logits.float()
    del exact_model
    model.to(device)
    outputs = {"bf16 reference": model(prompt).logits.float()}
    summaries = {}
    for kernel in args.kernels.split(","):
        packed_model = copy.deepcopy(model)
        summaries[kernel] = swap_to_packed(packed_model, quantized, kernel)
        outputs[f"packed ({kernel})"] = packed_model(prompt).logits.float()
        del packed_model
    scale = exact.abs().max().item()
    comparison = {
        label: {
            "relative_max_error_vs_exact": (out - exact).abs().max().item() / scale,
            "argmax_agreement_vs_exact": (out.argmax(-1) == exact.argmax(-1)).float().mean().item(),
        }
        for label, out in outputs.items()
    }
    for label, row in comparison.items():
        print(f"{label:32s} {row}", flush=True)
    record = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "vocab")},
        "calibration": f"{args.samples} x {args.seq_len} random tokens",
        "config": config.to_dict(),
        "seconds_total": round(total, 1),
        "seconds_per_layer_median": round(statistics.median(layer_seconds), 2),
        "seconds_per_layer_max": round(max(layer_seconds), 2),
        "peak_gpu_memory_bytes": peak,
        "phase_seconds": {k: round(v, 1) for k, v in phases.items()},
        "hessian_products_per_linear": products,
        "kernel_summaries": summaries,
        "logits_max_abs_exact": scale,
        "logits_vs_exact": comparison,
    }
    print(json.dumps(record, indent=2))
    if args.json is not None:
        harness.write_json(args.json, record)


if __name__ == "__main__":
    main()
