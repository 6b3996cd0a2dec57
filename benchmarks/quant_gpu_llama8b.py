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
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build_model(layers: int, hidden: int, intermediate: int, vocab: int):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 128, 1),
        num_key_value_heads=max(hidden // 512, 1),
        vocab_size=vocab,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    init = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(init):  # random init is much faster on the GPU
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.to("cpu").eval()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from openpto.api import quantize_
    from openpto.core.quant import GPTQConfig
    from openpto.kernels import model_kernel_summary, swap_to_packed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model = build_model(args.layers, args.hidden, args.intermediate, args.vocab)
    print(f"built in {time.perf_counter() - started:.1f}s", flush=True)
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

    config = GPTQConfig(bits=4, group_size=args.group_size)
    started = time.perf_counter()
    result = quantize_(model, config, calib, device=device, on_layer=on_layer)
    total = time.perf_counter() - started
    layer_seconds = [e.seconds for e in events]
    peak = max((e.peak_memory_bytes or 0) for e in events)

    # Packed CUDA path vs the dequantized reference, same weights.
    model.to(device)
    prompt = torch.randint(0, args.vocab, (1, 64), generator=torch.Generator().manual_seed(1)).to(
        device
    )
    reference = model(prompt).logits.float()
    summary = swap_to_packed(model, result.quantized_weights())
    packed = model(prompt).logits.float()
    scale = reference.abs().max().item()
    max_err = (packed - reference).abs().max().item()
    agree = (packed.argmax(-1) == reference.argmax(-1)).float().mean().item()
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate", "vocab")},
        "calibration": f"{args.samples} x {args.seq_len} random tokens",
        "config": config.to_dict(),
        "seconds_total": round(total, 1),
        "seconds_per_layer_median": round(statistics.median(layer_seconds), 2),
        "seconds_per_layer_max": round(max(layer_seconds), 2),
        "peak_gpu_memory_bytes": peak,
        "kernels": summary,
        "logits_max_abs_error": max_err,
        "logits_max_abs": scale,
        "logits_relative_error": max_err / scale,
        "argmax_agreement": agree,
        "model_kernel_summary": model_kernel_summary(model),
    }
    print(json.dumps(record, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
