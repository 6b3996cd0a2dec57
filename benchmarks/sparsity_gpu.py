"""2:4 sparsity on CUDA: cuSPARSELt Linear layers and end-to-end prefill against dense bf16.

1. Layers at Llama-3-8B shapes (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down
   4096x14336) for 1..4096 tokens: dense ``F.linear`` against ``Sparse24Linear``'s sparse path,
   device time per call (CUDA events, median of ``--repeats``; L2 flushed before each call by
   *reading* a 256 MB buffer; a ``torch.cuda._sleep`` spin enqueued first so host launch cost is
   hidden), plus the host cost of one eager call, plus the theoretical bounds next to the ratio.
2. End-to-end prefill of a randomly initialised Llama-3-8B-shaped decoder (pure torch: RMSNorm,
   GQA attention through SDPA with RoPE, SwiGLU MLP; logits for the last token only, as a server
   computes them) pruned 2:4 by magnitude, dense against ``swap_to_sparse24``, eager and inside a
   captured CUDA graph (``CapturedCall``), batch 1.

Speed only: the weights are random (a valid speed benchmark, never a quality one).

Usage: PYTHONPATH=src python benchmarks/sparsity_gpu.py --out results.json [--layers 32]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import harness
import torch
import torch.nn.functional as F
from torch import nn

from openpto.core.sparsity import nm_mask, speedup_bounds
from openpto.kernels import sparse24

_LLAMA = harness.LLAMA3_8B
_NAMES = {"q/o": "q_proj/o_proj", "k/v": "k_proj/v_proj", "gate/up": "gate/up", "down": "down"}
SHAPES = {  # name: (out_features, in_features) of Llama-3-8B
    f"{_NAMES[key]} {out}x{width}": (out, width)
    for key, (out, width) in harness.linear_shapes(_LLAMA).items() if key in _NAMES
}
TOKENS = (1, 16, 128, 256, 512, 1024, 2048, 4096)
PEAK_FLOPS = 750e12  # measured bf16 dense matmul ceiling on the H200 (docs/benchmarks.md, 2:4)
BANDWIDTH = 4.25e12  # measured device copy ceiling, bytes/s


class Timer:
    """Device time per call from the library's event timer, with a spin of about 1 ms queued
    before each call (eager cuSPARSELt calls cost 0.5-0.75 ms of host time, which a shorter
    spin would let into the measured interval); host time per call measured apart."""

    def __init__(self) -> None:
        self.timer = harness.device_timer()

    def device_us(self, fn: Any, repeats: int) -> float:
        median, _ = self.timer.device_time(fn, reps=repeats, warmup=0, spin_cycles=2_000_000)
        return float(median * 1e6)

    @staticmethod
    def host_us(fn: Any, calls: int = 20) -> float:
        torch.cuda._sleep(100_000_000)  # keep the device busy so only enqueueing is timed
        with harness.stopwatch() as enqueue:  # no device synchronisation: host time only
            for _ in range(calls):
                fn()
        torch.cuda.synchronize()
        return enqueue.wall / calls * 1e6


def pruned_weight(out: int, width: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(out, width, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    return w * nm_mask(w.abs(), 2, 4)


def bench_layers(args: argparse.Namespace, results: dict[str, Any], deadline: float) -> None:
    timer = Timer()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = results.setdefault("layers", [])
    for shape_name, (out, width) in SHAPES.items():
        linear = nn.Linear(width, out, bias=False, device="cuda", dtype=torch.bfloat16)
        linear.weight.data = pruned_weight(out, width, gen)
        layer = sparse24.Sparse24Linear(linear, min_tokens=1)  # always the sparse path here
        probe = torch.randn(64, width, device="cuda", dtype=torch.bfloat16)
        results.setdefault("torch_linear_output_strides", {})[shape_name] = list(
            F.linear(probe, layer.packed).stride())
        for tokens in TOKENS:
            if time.perf_counter() > deadline:
                results.setdefault("skipped", []).append(f"layers {shape_name} {tokens}: budget")
                continue
            x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, generator=gen)
            dense_fn = functools.partial(F.linear, x, linear.weight)
            sparse_fn = functools.partial(layer, x)
            reference = dense_fn().float()
            error = float((sparse_fn().float() - reference).norm() / reference.norm())
            dense = timer.device_us(dense_fn, args.repeats)
            sparse = timer.device_us(sparse_fn, args.repeats)
            # torch's own F.linear on the compressed weight (column-major output), for contrast
            raw = timer.device_us(functools.partial(F.linear, x, layer.packed), args.repeats)
            bounds = speedup_bounds(out, width, tokens, layout="2:4",
                                    peak_flops=PEAK_FLOPS, bandwidth=BANDWIDTH)
            row = {
                "shape": shape_name, "tokens": tokens, "dense_us": dense, "sparse_us": sparse,
                "speedup": dense / sparse, "torch_linear_us": raw,
                "output_row_major": sparse_fn().is_contiguous(),
                "host_us_dense": Timer.host_us(dense_fn),
                "host_us_sparse": Timer.host_us(sparse_fn),
                "bound_compute": bounds.compute_bound, "bound_memory": bounds.memory_bound,
                "bound_roofline": bounds.roofline, "relative_error_vs_dense": error,
            }
            rows.append(row)
            print(f"{shape_name:26s} {tokens:5d} tok  dense {dense:8.1f} us  2:4 {sparse:8.1f} us"
                  f"  x{dense / sparse:5.2f}  (torch F.linear {raw:8.1f} us; roofline "
                  f"x{bounds.roofline:4.2f})", flush=True)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# A Llama-3-8B-shaped decoder in plain torch


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device="cuda", dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + 1e-5)).to(x.dtype) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, hidden: int, inter: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        kw: dict[str, Any] = {"bias": False, "device": "cuda", "dtype": torch.bfloat16}
        self.q_proj = nn.Linear(hidden, hidden, **kw)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, **kw)
        self.o_proj = nn.Linear(hidden, hidden, **kw)
        self.gate_proj = nn.Linear(hidden, inter, **kw)
        self.up_proj = nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)
        self.norm1, self.norm2 = RMSNorm(hidden), RMSNorm(hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(nn.Module):
    def __init__(self, layers: int, vocab: int = _LLAMA["vocab_size"],
                 hidden: int = _LLAMA["hidden_size"], inter: int = _LLAMA["intermediate_size"],
                 heads: int = _LLAMA["num_attention_heads"],
                 kv_heads: int = _LLAMA["num_key_value_heads"]) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden, device="cuda", dtype=torch.bfloat16)
        self.layers = nn.ModuleList(Block(hidden, inter, heads, kv_heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
        self.head_dim = hidden // heads

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device, dtype=torch.float32)
        steps = torch.arange(0, self.head_dim, 2, device=ids.device) / self.head_dim
        inv = 1.0 / (_LLAMA["rope_theta"] ** steps)
        freqs = torch.outer(pos, inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x[:, -1:]))  # the last token's logits only


def time_prefill(fn: Any, ids: torch.Tensor, repeats: int) -> float:
    """Median ms of ``fn(ids)`` after one warm-up call, synchronised (milliseconds of work, so
    the host clock and CUDA events agree)."""
    timing = harness.time_calls(lambda: fn(ids), repeats=repeats, warmup=1, device="cuda")
    return timing.median * 1e3


def timed(fn: Any, ids: torch.Tensor, mode: str, repeats: int) -> tuple[float | None, str | None]:
    """Median ms of ``fn(ids)``, eager or replayed from a captured graph; a failed capture is
    reported, not hidden."""
    try:
        call = fn if mode == "eager" else sparse24.CapturedCall(fn, ids)
        return time_prefill(call, ids, repeats), None
    except Exception as exc:
        traceback.print_exc()
        return None, "".join(traceback.format_exception_only(type(exc), exc)).strip()


def bench_prefill(args: argparse.Namespace, results: dict[str, Any], deadline: float) -> None:
    torch.manual_seed(0)
    model = Decoder(args.layers).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02)
        for layer in model.layers:
            for linear in (m for m in layer.modules() if isinstance(m, nn.Linear)):
                linear.weight.mul_(nm_mask(linear.weight.abs(), 2, 4))
    gen = torch.Generator(device="cuda").manual_seed(1)
    info = results.setdefault("prefill", {"layers": args.layers, "runs": []})
    dense_ms: dict[tuple[int, str], tuple[float | None, str | None]] = {}
    with torch.no_grad():
        for tokens in args.prefill_tokens:
            ids = torch.randint(0, _LLAMA["vocab_size"], (1, tokens), device="cuda", generator=gen)
            for mode in ("eager", "graph"):
                dense_ms[(tokens, mode)] = timed(model, ids, mode, args.repeats)
                print(f"dense prefill {tokens} {mode}: {dense_ms[(tokens, mode)]}", flush=True)
        reference = {t: model(torch.randint(0, _LLAMA["vocab_size"], (1, t), device="cuda",
                                            generator=torch.Generator(device="cuda").manual_seed(t)))
                     for t in args.prefill_tokens}
        decoder_linears = [f"layers.{i}.{n}" for i, layer in enumerate(model.layers)
                           for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        with harness.stopwatch() as swap:
            outcome = sparse24.swap_to_sparse24(model, args.min_tokens, decoder_linears)
        info["swap_seconds"] = swap.wall
        info["swapped"] = sum(v == sparse24.KERNEL_NAME for v in outcome.values())
        info["outcome_by_kind"] = {
            kind: sorted({v for n, v in outcome.items() if n.endswith(kind)})
            for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj")
        }
        print(f"swapped {info['swapped']} of {len(outcome)}: {info['outcome_by_kind']}",
              flush=True)
        info["min_tokens"] = args.min_tokens
        info["memory_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        for tokens in args.prefill_tokens:
            if time.perf_counter() > deadline:
                results.setdefault("skipped", []).append(f"prefill {tokens}: budget")
                continue
            ids = torch.randint(0, _LLAMA["vocab_size"], (1, tokens), device="cuda",
                                generator=torch.Generator(device="cuda").manual_seed(tokens))
            logits = model(ids)
            agree = float(F.cosine_similarity(logits.float().flatten(),
                                              reference[tokens].float().flatten(), dim=0))
            for mode in ("eager", "graph"):
                sparse_ms, error = timed(model, ids, mode, args.repeats)
                base, base_error = dense_ms[(tokens, mode)]
                ratio = base / sparse_ms if base and sparse_ms else None
                run = {"tokens": tokens, "mode": mode, "dense_ms": base, "sparse_ms": sparse_ms,
                       "speedup": ratio, "sparse_path": tokens >= args.min_tokens,
                       "logits_cosine_vs_dense": agree, "error": error or base_error}
                info["runs"].append(run)
                print(f"prefill {tokens:5d} tok {mode:5s}: dense {base} ms  2:4 {sparse_ms} ms"
                      f"  x{ratio}  (cos {agree:.5f}) {error or base_error or ''}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=harness.result_path("sparsity_gpu"))
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-3-8B: 32)")
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[128, 512, 2048, 4096])
    parser.add_argument("--min-tokens", type=int, default=sparse24.DEFAULT_MIN_TOKENS)
    parser.add_argument("--budget-s", type=float, default=180.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs CUDA; benchmarks/sparsity_cpu.py covers the CPU")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "cusparselt": torch.backends.cusparselt.version(), "dtype": "bfloat16",
        "timing": "layers: CUDA events, median; L2 flushed by reading 256 MB; host cost hidden by "
                  "a spin. prefill: synchronised wall clock, median",
    }
    for name, bench, share in (("layers", bench_layers, 0.45), ("prefill", bench_prefill, 1.0)):
        deadline = started + args.budget_s * share
        try:
            bench(args, results, deadline)
        except Exception as exc:  # record the failure in the results, then go on to the next part
            results.setdefault("errors", {})[name] = "".join(
                traceback.format_exception_only(type(exc), exc)).strip()
            traceback.print_exc()
        harness.write_json(args.out, results)
        torch.cuda.empty_cache()
    results["seconds"] = time.perf_counter() - started
    harness.write_json(args.out, results)
    print(f"wrote {args.out} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
