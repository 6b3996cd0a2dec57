"""Layer-sequential GPTQ of a random Llama-3-8B-shaped model on one GPU, then the packed CUDA path
against the dequantized reference.

The model (random weights: a speed and memory benchmark, never a quality one) lives on the CPU
in bfloat16; the driver moves one decoder layer at a time to the GPU, so peak GPU memory is one
layer plus the calibration activations. After quantization the model holds the dequantized
weights (the reference); its Linears are then swapped for packed ``QuantLinear`` modules
(``tinygemm-int4-cuda``) and the logits compared. Runs without the run store (no sqlite-utils
needed).

    PYTHONPATH=src python benchmarks/quant_gpu.py --layers 8 --json $OUT/quant_gpu.json
"""

from __future__ import annotations

import argparse
import json

import harness
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (Llama-3-8B: 32)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--json", default=str(harness.result_path("quant_gpu")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shrink", type=int, default=1, help="divide widths (CPU smoke test)")
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    from openpto.api import quantize_
    from openpto.core.quant import GPTQConfig
    from openpto.kernels import model_kernel_summary, swap_to_packed

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with harness.stopwatch() as build:
        torch.set_default_dtype(torch.bfloat16)
        config_hf = harness.llama_config(
            harness.llama3_8b(args.shrink, num_hidden_layers=args.layers, rms_norm_eps=1e-5))
        model = LlamaForCausalLM(config_hf).eval()
        torch.set_default_dtype(torch.float32)
    build_seconds = build.wall
    vocab = config_hf.vocab_size
    calib = torch.randint(0, vocab, (args.samples, args.seq_len))

    layers: list[dict] = []

    def on_layer(event) -> None:  # type: ignore[no-untyped-def]
        layers.append({"index": event.index, "seconds": event.seconds,
                       "peak_gpu_bytes": event.peak_memory_bytes,
                       "mean_error": sum(r.error for r in event.reports) / len(event.reports)})
        print(f"layer {event.index:2d}: {event.seconds:6.2f} s, peak GPU "
              f"{(event.peak_memory_bytes or 0) / 2**30:6.2f} GiB", flush=True)

    config = GPTQConfig(bits=4, group_size=args.group_size, symmetric=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with harness.stopwatch(device) as quantization:
        result = quantize_(model, config, calib, device=device, on_layer=on_layer)
    quant_seconds = quantization.wall
    peak = torch.cuda.max_memory_allocated(device) if cuda else None

    # Reference: the model with its dequantized bf16 weights, all on the GPU.
    model.to(device)
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = model(ids).logits.float()
    quantized = {n: q.to(device) for n, q in result.quantized_weights().items()}
    summary = swap_to_packed(model, quantized, kernel="auto")
    with torch.no_grad():
        got = model(ids).logits.float()
    diff = (got - ref).abs()
    scale = ref.abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    report = {
        "model": f"random Llama-3-8B shape / {args.shrink}, {args.layers} of 32 decoder layers, "
                 "bfloat16",
        "method": config.to_dict(),
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        "build_seconds": build_seconds,
        "quantize_seconds": quant_seconds,
        "seconds_per_layer_median": sorted(x["seconds"] for x in layers)[len(layers) // 2],
        "peak_gpu_bytes": peak,
        "layers": layers,
        "kernels": summary,
        "kernel_check": {
            "max_abs_diff": diff.max().item(), "max_abs_logit": scale,
            "max_rel_diff": diff.max().item() / scale, "mean_abs_diff": diff.mean().item(),
            "argmax_agreement": agree,
        },
        "packed_kernels": model_kernel_summary(model),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "layers"}, indent=2))
    harness.write_json(args.json, report)


if __name__ == "__main__":
    main()
