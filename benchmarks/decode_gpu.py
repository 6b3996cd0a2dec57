"""Batch-1 decode on a GPU: our engine against transformers ``generate`` and the bandwidth floor.

The model is a randomly initialised Llama-3-8B-shaped ``LlamaForCausalLM`` in bf16 (a valid
speed benchmark, never a quality one). Prompt: 128 random token ids; 128 new tokens, greedy,
end-of-sequence ignored. Each path is timed end to end with ``torch.cuda.synchronize`` around it;
decode tokens/s = 127 / (time for 128 new tokens - time for 1 new token), medians over repeats,
so both paths are measured by the same stopwatch. The floor is the time to read every weight
byte the decode touches once per token (all decoder and lm_head weights; the embedding lookup
reads one row) at the measured device-to-device copy bandwidth ((read + write) bytes / time,
1 GiB buffers, median of 20).

    python benchmarks/decode_gpu.py --out benchmarks/results/decode_gpu.json
    python benchmarks/decode_gpu.py --tiny   # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from openpto.core.generate import generate_text
from openpto.core.sampling import SamplingParams

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
            tie_word_embeddings=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 20) -> float:
    """(bytes read + bytes written) / time of a device-to-device copy, median of ``repeats``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[2:])


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def decode_rate(run: Callable[[int], Any], device: torch.device, new: int, repeats: int
                ) -> dict[str, float]:
    run(new)  # warm-up
    run(1)
    full, first = [], []
    for _ in range(repeats):
        full.append(timed(lambda: run(new), device))
        first.append(timed(lambda: run(1), device))
    decode = statistics.median(full) - statistics.median(first)
    return {"decode_tokens_per_second": (new - 1) / decode,
            "end_to_end_tokens_per_second": new / statistics.median(full),
            "ttft_ms": statistics.median(first) * 1e3,
            "full_seconds": [round(t, 4) for t in full]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny config on CPU (smoke test)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_gpu.json"))
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers import __version__ as hf_version

    device = torch.device("cpu" if args.tiny else "cuda")
    started = time.perf_counter()
    bandwidth = copy_bandwidth(device, 2**24 if args.tiny else 2**30)
    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.eval()
    built = time.perf_counter() - started
    embed = model.get_input_embeddings().weight.numel() * 2
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    read_per_token = weight_bytes - embed
    floor = bandwidth / read_per_token
    prompt = torch.randint(8, config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)

    def ours(new: int) -> Any:
        return generate_text(model, None, prompt[0], SamplingParams(max_tokens=new),
                             ignore_eos=True)

    gen_config = model.generation_config
    gen_config.eos_token_id = None
    gen_config.pad_token_id = 0
    gen_config.do_sample = False

    def hf(new: int) -> Any:
        with torch.inference_mode():
            gen_config.max_new_tokens = gen_config.min_new_tokens = new
            return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                  generation_config=gen_config)

    results = {"ours (eager, DynamicCache)": decode_rate(ours, device, args.new_tokens,
                                                         args.repeats),
               "transformers generate (eager)": decode_rate(hf, device, args.new_tokens,
                                                            args.repeats)}
    same = ours(32).token_ids == [int(t) for t in hf(32)[0, args.prompt_len:]]
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "transformers": hf_version,
               "python": platform.python_version()}
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine,
        "model": "random Llama-3-8B shape, bf16" if not args.tiny else "tiny random Llama",
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "copy_bandwidth_bytes_per_second": bandwidth, "weight_bytes": weight_bytes,
        "bytes_read_per_token": read_per_token, "floor_tokens_per_second": floor,
        "first_32_greedy_tokens_equal": same, "build_seconds": built, "results": results,
    }
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s, {read_per_token / 1e9:.2f} GB read per "
          f"token -> floor {floor:.1f} tok/s")
    print("| path | decode tok/s | % of floor | end-to-end tok/s | TTFT ms |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['decode_tokens_per_second']:.1f} | "
              f"{100 * r['decode_tokens_per_second'] / floor:.0f}% | "
              f"{r['end_to_end_tokens_per_second']:.1f} | {r['ttft_ms']:.1f} |")
    print(f"greedy tokens equal over 32 steps: {same}; total {time.perf_counter() - started:.0f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
