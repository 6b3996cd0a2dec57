"""Batch-1 decode on a GPU: our engine against transformers ``generate`` and the bandwidth floor.

The model is a randomly initialised Llama-3-8B-shaped ``LlamaForCausalLM`` in bf16 (a valid
speed benchmark, never a quality one). Prompt: 128 random token ids; 128 new tokens, greedy,
end-of-sequence ignored. Each path is timed end to end with ``torch.cuda.synchronize`` around it;
decode tokens/s = 127 / (time for 128 new tokens - time for 1 new token), medians over repeats,
so every path is measured by the same stopwatch. The floor is the time to read every weight
byte the decode touches once per token (all decoder and lm_head weights; the embedding lookup
reads one row) at the measured device-to-device copy bandwidth ((read + write) bytes / time,
1 GiB buffers, median of 20).

Paths: our ``generate_text`` with ``decode="dynamic"`` (eager steps over a DynamicCache) and
``decode="graph"`` (static cache, each step one CUDA-graph replay; ``core.static_decode``);
transformers ``generate`` eager and with a StaticCache (which makes it ``torch.compile`` the
decode step on CUDA; one cache of fixed length, reset per call, so no shape recompiles). Then the
decoder Linears are swapped in place for packed int4 ``QuantLinear``s (round-to-nearest, group
128, asymmetric; lm_head stays bf16) and our two paths run again against the int4 floor. Greedy
tokens of each path are compared with our eager path over the first 32 steps (int4 with int4).

    PYTHONPATH=src python benchmarks/decode_gpu.py --out benchmarks/results/decode_gpu.json
    PYTHONPATH=src python benchmarks/decode_gpu.py --tiny   # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import torch

from openpto.core.generate import generate_text
from openpto.core.sampling import SamplingParams


def decode_rate(run: Callable[[int], Any], device: torch.device, new: int, repeats: int
                ) -> dict[str, Any]:
    """One warm-up of each, then ``repeats`` rounds of a full run and a 1-token run."""
    times = harness.time_round_robin({"full": lambda: run(new), "first": lambda: run(1)},
                                     repeats=repeats, warmup=1, device=device)
    full, first = times["full"], times["first"]
    decode = full.median - first.median
    return {"decode_tokens_per_second": (new - 1) / decode,
            "end_to_end_tokens_per_second": new / full.median,
            "ttft_ms": first.median * 1e3,
            "full_seconds": [round(t, 4) for t in full.seconds]}


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def swap_to_int4(model: torch.nn.Module) -> dict[str, int]:
    """Every decoder Linear -> packed int4 QuantLinear (RTN g128), one at a time to bound memory."""
    from openpto.core.quant.tensor import quantize_weight
    from openpto.kernels import model_kernel_summary, swap_to_packed

    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")]
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, torch.nn.Linear)
        weight = linear.weight.data
        swap_to_packed(model, {name: quantize_weight(weight, 4, 128, False)},
                       dtype=torch.bfloat16)
    return model_kernel_summary(model)


def read_bytes(model: Any) -> int:
    """Bytes one decode step reads: every parameter and buffer except the embedding table."""
    embed = model.get_input_embeddings().weight
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not embed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny config on CPU (smoke test)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated path keys to leave out: "
                        "ours-eager,ours-graph,hf-eager,hf-static,ours-compiled,int4, "
                        "int4-eager,int4-graph,int4-compiled")
    parser.add_argument("--out", type=Path, default=harness.result_path("decode_gpu"))
    args = parser.parse_args()
    from transformers import LlamaForCausalLM, StaticCache

    from openpto.core.static_decode import kept_decoder

    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cpu" if args.tiny else "cuda")
    # On CPU there is no graph to capture: the smoke run takes the same static cache eagerly.
    graph_mode = "graph" if device.type == "cuda" else "static"
    started, cpu_started = time.perf_counter(), time.process_time()
    bandwidth = harness.copy_bandwidth(device, 2**24 if args.tiny else 2**30)
    config = harness.llama_config(harness.TINY_LLAMA if args.tiny else harness.LLAMA3_8B)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.eval()
    built = time.perf_counter() - started
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    read_per_token = read_bytes(model)
    floor = bandwidth / read_per_token
    prompt = torch.randint(8, config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)
    report: dict[str, Any] = {
        "model": "random Llama-3-8B shape, bf16" if not args.tiny else "tiny random Llama",
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "copy_bandwidth_bytes_per_second": bandwidth, "weight_bytes": weight_bytes,
        "bytes_read_per_token": read_per_token, "floor_tokens_per_second": floor,
        "build_seconds": built, "results": {}, "first_32_greedy": {},
    }
    results: dict[str, dict[str, Any]] = report["results"]

    def save() -> None:
        harness.write_json(args.out, report)

    def ours(decode: str) -> Callable[[int], Any]:
        def run(new: int) -> Any:
            return generate_text(model, None, prompt[0], SamplingParams(max_tokens=new),
                                 ignore_eos=True, decode=decode)
        return run

    gen_config = model.generation_config
    gen_config.eos_token_id = None
    gen_config.pad_token_id = 0
    gen_config.do_sample = False

    def hf(static: bool) -> Callable[[int], Any]:
        # One cache of fixed length for every call: the compiled step never sees a new shape.
        cache = StaticCache(config=config,
                            max_cache_len=args.prompt_len + max(args.new_tokens, 32))

        def run(new: int) -> Any:
            with torch.inference_mode():
                gen_config.max_new_tokens = gen_config.min_new_tokens = new
                extra: dict[str, Any] = {}
                if static:
                    cache.reset()
                    extra["past_key_values"] = cache
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                     generation_config=gen_config, **extra)
                return [int(t) for t in out[0, args.prompt_len:]]
        return run

    def first_tokens(run: Callable[[int], Any]) -> list[int]:
        out = run(32)
        return list(out.token_ids) if hasattr(out, "token_ids") else list(out)

    def measure(key: str, name: str, run: Callable[[int], Any], path_floor: float,
                reference: str | None = None, decode: str | None = None) -> None:
        if key in skip:
            return
        t0 = time.perf_counter()  # warm-up, timed runs and token checks, for the record only
        try:
            row = decode_rate(run, device, args.new_tokens, args.repeats)
            tokens = first_tokens(run)
        except Exception as exc:  # one failing path must not lose the others' numbers
            results[name] = {"error": repr(exc)[:500]}
            print(f"{name}: failed: {exc!r}"[:300], flush=True)
            save()
            return
        row["floor_tokens_per_second"] = path_floor
        row["fraction_of_floor"] = row["decode_tokens_per_second"] / path_floor
        row["seconds_with_warmup"] = time.perf_counter() - t0
        if decode is not None:
            row["decode"] = decode
        if decode in ("graph", "compiled"):
            kept = kept_decoder(model)
            row["graph_captured"] = kept is not None and kept.graph is not None
        report["first_32_greedy"][name] = tokens
        if reference is not None and reference in report["first_32_greedy"]:
            ref = report["first_32_greedy"][reference]
            row["first_32_agree_with"] = reference
            row["first_32_agreeing_prefix"] = agreeing_prefix(tokens, ref)
        if decode == "graph" and device.type == "cuda":
            # The same cache and kernels stepped eagerly: a replay must give the same tokens
            # (the dynamic cache attends over other shapes, so a random model may drift from it).
            row["first_32_agreeing_prefix_vs_static_eager"] = agreeing_prefix(
                tokens, first_tokens(ours("static")))
        results[name] = row
        print(f"{name}: {row['decode_tokens_per_second']:.1f} tok/s "
              f"({100 * row['fraction_of_floor']:.0f}% of {path_floor:.0f})", flush=True)
        save()

    eager = "ours (eager, DynamicCache)"
    step = "CUDA graph" if graph_mode == "graph" else "eager"
    measure("ours-eager", eager, ours("dynamic"), floor, decode="dynamic")
    measure("ours-graph", f"ours (static cache, {step})", ours(graph_mode), floor, eager,
            decode=graph_mode)
    measure("hf-eager", "transformers generate (eager)", hf(False), floor, eager)
    measure("hf-static", "transformers generate (static cache, torch.compile)", hf(True), floor,
            eager)
    if device.type == "cuda":  # on CPU "compiled" falls back to the eager path measured above
        measure("ours-compiled", "ours (static cache, torch.compile + CUDA graph)",
                ours("compiled"), floor, eager, decode="compiled")
    if "int4" not in skip:
        with harness.stopwatch() as swap:
            report["int4_kernels"] = swap_to_int4(model)
        report["int4_swap_seconds"] = swap.wall
        report["int4_bytes_read_per_token"] = int4_bytes = read_bytes(model)
        report["int4_floor_tokens_per_second"] = int4_floor = bandwidth / int4_bytes
        int4_eager = "ours int4 (eager, DynamicCache)"
        measure("int4-eager", int4_eager, ours("dynamic"), int4_floor, decode="dynamic")
        measure("int4-graph", f"ours int4 (static cache, {step})", ours(graph_mode), int4_floor,
                int4_eager, decode=graph_mode)
        if device.type == "cuda":
            measure("int4-compiled", "ours int4 (static cache, torch.compile + CUDA graph)",
                    ours("compiled"), int4_floor, int4_eager, decode="compiled")
    report["total_seconds"] = time.perf_counter() - started
    report["cpu_seconds"] = time.process_time() - cpu_started
    if device.type == "cuda":
        report["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    save()
    print(f"copy bandwidth {bandwidth / 1e12:.3f} TB/s, {read_per_token / 1e9:.2f} GB read per "
          f"token -> floor {floor:.1f} tok/s")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, f"failed: {r['error'][:100]}", "", "", "", "", ""])
            continue
        agree = (f"{r['first_32_agreeing_prefix']}/32" if "first_32_agreeing_prefix" in r
                 else "reference")
        rows.append([name, f"{r['decode_tokens_per_second']:.1f}",
                     f"{r['floor_tokens_per_second']:.0f}", f"{100 * r['fraction_of_floor']:.0f}%",
                     f"{r['end_to_end_tokens_per_second']:.1f}", f"{r['ttft_ms']:.1f}", agree])
    print(harness.markdown_table(["path", "decode tok/s", "floor tok/s", "% of floor",
                                  "end-to-end tok/s", "TTFT ms", "first 32 greedy agree"], rows))
    print(f"total {report['total_seconds']:.0f}s wall, {report['cpu_seconds']:.0f}s CPU")


if __name__ == "__main__":
    main()
