"""End-to-end batch-1 decode of a random Llama-3-8B-shaped model: bf16 vs int4 vs 2:4+int4.

Run on a CUDA machine from the repository root:

    PYTHONPATH=src python benchmarks/gpu_decode_e2e.py --json decode.json [--compile]

A minimal decoder (RMSNorm, fused QKV and gate/up projections, RoPE, GQA attention over a static
KV cache) with random weights: 32 layers, hidden 4096, MLP 14336, 32 query / 8 KV heads, vocab
128256 (bf16 embeddings and LM head in every variant). A 128-token prompt is prefilled, then each
of 128 new tokens runs as one CUDA-graph replay of the whole decode step (greedy argmax inside the
graph). ``--compile`` also runs the step through ``torch.compile`` (the Triton matmuls are custom
ops) before capture, fusing the element-wise work between the matmuls.

The floor of each variant is the bytes one step must read (every weight once, the LM head, the KV
cache so far) over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import harness
import torch
import torch.nn.functional as F

from openpto.kernels import gpu_dispatch as gd

_L = harness.LLAMA3_8B
HIDDEN, INTER, LAYERS = _L["hidden_size"], _L["intermediate_size"], _L["num_hidden_layers"]
HEADS, KV_HEADS, VOCAB = _L["num_attention_heads"], _L["num_key_value_heads"], _L["vocab_size"]
HEAD_DIM = harness.head_dim(_L)
PROMPT, NEW = 128, 128
MAX_LEN = PROMPT + NEW
GROUP = 128


def _register_ops() -> None:
    """Our Triton matmuls as torch custom ops, so torch.compile keeps them as opaque calls."""
    from openpto.kernels.triton import sparse24, tuned, w4a16

    @torch.library.custom_op("openpto_bench::w4a16", mutates_args=())
    def w4a16_op(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        n, k = qweight.shape[1], x.shape[1]
        launch = gd.choose_w4a16(x.shape[0], n, k, tuned.W4A16)
        return w4a16.w4a16_matmul(x, qweight, sz, GROUP, launch)

    @w4a16_op.register_fake
    def _(x: torch.Tensor, qweight: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], qweight.shape[1])

    @torch.library.custom_op("openpto_bench::sp24", mutates_args=())
    def sp24_op(
        x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, sz: torch.Tensor
    ) -> torch.Tensor:
        n, k = meta.shape[1], x.shape[1]
        if x.shape[0] > 16:
            return x @ sparse24.expand24(values, meta, x.dtype, sz, GROUP)
        launch = gd.choose_24(x.shape[0], n, k, "int4", tuned.SPARSE24)
        return sparse24.sparse24_matmul(x, values, meta, launch, sz, GROUP)

    @sp24_op.register_fake
    def _(
        x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, sz: torch.Tensor
    ) -> torch.Tensor:
        return x.new_empty(x.shape[0], meta.shape[1])


def _random_sz(n: int, k: int) -> torch.Tensor:
    scale = torch.rand(n, k // GROUP, device="cuda") * 0.002 + 0.001
    zero = torch.randint(0, 16, (n, k // GROUP), device="cuda").float()
    return gd.pack_scale_zero(scale, zero)


def make_linear(kind: str, n: int, k: int) -> dict[str, torch.Tensor]:
    if kind == "bf16":
        return {"w": torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02}
    words = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), device="cuda", dtype=torch.int32)
    if kind == "int4":
        return {"qweight": words, "sz": _random_sz(n, k)}
    # 2:4: the 6 valid (p0 < p1) position pairs as meta nibbles, random values
    pairs = torch.tensor([p0 | (p1 << 2) for p0 in range(4) for p1 in range(p0 + 1, 4)])
    nib = pairs.cuda()[torch.randint(0, 6, (k // 32, n, 8), device="cuda")]
    meta = (nib << torch.arange(0, 32, 4, device="cuda")).sum(-1)
    meta = torch.where(meta >= 2**31, meta - 2**32, meta).to(torch.int32)
    return {"values": words[: k // 16].contiguous(), "meta": meta, "sz": _random_sz(n, k)}


def linear(kind: str, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if kind == "bf16":
        return F.linear(x, p["w"])
    if kind == "int4":
        return torch.ops.openpto_bench.w4a16(x, p["qweight"], p["sz"])
    return torch.ops.openpto_bench.sp24(x, p["values"], p["meta"], p["sz"])


def weight_bytes(p: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in p.values())


class Model:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.embed = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
        self.head = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
        self.layers: list[dict[str, Any]] = []
        for _ in range(LAYERS):
            self.layers.append(
                {
                    "qkv": make_linear(kind, (HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
                    "o": make_linear(kind, HIDDEN, HEADS * HEAD_DIM),
                    "gate_up": make_linear(kind, 2 * INTER, HIDDEN),
                    "down": make_linear(kind, HIDDEN, INTER),
                    "n1": torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16),
                    "n2": torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16),
                }
            )
        self.norm = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        shape = (LAYERS, 1, KV_HEADS, MAX_LEN, HEAD_DIM)
        self.k_cache = torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
        self.v_cache = torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
        steps = torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM
        inv = 1.0 / (_L["rope_theta"] ** steps)
        ang = torch.arange(MAX_LEN, device="cuda").float()[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos(), ang.sin()

    def linear_bytes(self) -> int:
        return sum(
            weight_bytes(layer[name])
            for layer in self.layers
            for name in ("qkv", "o", "gate_up", "down")
        )

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, layer_fn: Any = None) -> torch.Tensor:
        """``tokens [T]`` at positions ``pos [T]`` -> next token ids ``[T]`` (greedy)."""
        layer_fn = layer_fn or layer_forward
        h = self.embed[tokens]
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        # causal mask over the whole static cache: query i sees cache slots <= pos[i]
        mask = torch.arange(MAX_LEN, device="cuda")[None, :] <= pos[:, None]
        for i, layer in enumerate(self.layers):
            h = layer_fn(self.kind, h, layer, self.k_cache[i], self.v_cache[i], cos, sin, mask, pos)
        logits = F.linear(F.rms_norm(h, (HIDDEN,), self.norm, 1e-5), self.head)
        return logits.argmax(-1)


def layer_forward(
    kind: str,
    h: torch.Tensor,
    layer: dict[str, Any],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """One decoder layer; the same function for every layer, so torch.compile compiles it once."""
    t = h.shape[0]
    x = F.rms_norm(h, (HIDDEN,), layer["n1"], 1e-5)
    qkv = linear(kind, layer["qkv"], x)
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
    q = _rope(q.view(t, HEADS, HEAD_DIM), cos, sin)
    k = _rope(k.view(t, KV_HEADS, HEAD_DIM), cos, sin)
    k_cache[0].index_copy_(1, pos, k.transpose(0, 1))
    v_cache[0].index_copy_(1, pos, v.view(t, KV_HEADS, HEAD_DIM).transpose(0, 1))
    att = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k_cache, v_cache, attn_mask=mask[None, None], enable_gqa=True
    )
    h = h + linear(kind, layer["o"], att[0].transpose(0, 1).reshape(t, -1))
    x = F.rms_norm(h, (HIDDEN,), layer["n2"], 1e-5)
    gate, up = linear(kind, layer["gate_up"], x).chunk(2, -1)
    return h + linear(kind, layer["down"], F.silu(gate) * up)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, -1)
    c, s = cos, sin
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)


def run_variant(kind: str, compiled: bool, copy_bw: float) -> dict[str, Any]:
    model = Model(kind)
    layer_fn = torch.compile(layer_forward, dynamic=False) if compiled else layer_forward

    def step(tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return model.step(tok, pos, layer_fn)

    prompt = torch.randint(0, VOCAB, (PROMPT,), device="cuda")
    with harness.stopwatch("cuda") as prefill:
        nxt = model.step(prompt, torch.arange(PROMPT, device="cuda"))[-1:]
    tok = nxt.clone()
    pos = torch.tensor([PROMPT], device="cuda")
    with harness.stopwatch("cuda") as warm:
        for _ in range(3):  # warm-up (and compilation) outside the graph, on throwaway positions
            step(tok, pos)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(tok, pos)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = step(tok, pos)
    out_tokens = []
    with harness.stopwatch("cuda") as decode:
        for i in range(NEW):
            pos.fill_(PROMPT + i)
            graph.replay()
            tok.copy_(out)
            out_tokens.append(out)  # views of the graph output; kept only to force the copy order
    decode_s = decode.wall
    tok_per_s = NEW / decode_s
    kv_bytes = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2 * (PROMPT + NEW / 2)
    step_bytes = model.linear_bytes() + model.head.numel() * 2 + kv_bytes
    floor_tok_s = copy_bw / step_bytes
    result = {
        "variant": kind,
        "compiled": compiled,
        "tokens_per_s": tok_per_s,
        "ms_per_token": 1e3 * decode_s / NEW,
        "floor_tokens_per_s": floor_tok_s,
        "frac_of_floor": tok_per_s / floor_tok_s,
        "linear_weight_gb": model.linear_bytes() / 1e9,
        "step_gb": step_bytes / 1e9,
        "prefill_s": prefill.wall,
        "warmup_compile_s": warm.wall,
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=str(harness.result_path("gpu_decode_e2e")))
    ap.add_argument("--compile", action="store_true", help="also run torch.compile'd steps")
    ap.add_argument("--variants", default="bf16,int4,sp24")
    ap.add_argument("--w4a16-json", default=None, help="gpu_w4a16.py output: use its launches")
    args = ap.parse_args()
    if args.w4a16_json:
        from openpto.kernels.triton import tuned

        with open(args.w4a16_json) as f:
            for key, launch in json.load(f)["chosen"].items():
                n, k, bucket = (int(v) for v in key.split(","))
                tuned.W4A16[(n, k, bucket)] = gd.Launch(**launch)
    from openpto.kernels.triton.timing import copy_bandwidth

    _register_ops()
    copy_bw = copy_bandwidth()
    results = []
    modes = [False, True] if args.compile else [False]
    for compiled in modes:
        for kind in args.variants.split(","):
            try:
                r = run_variant(kind, compiled, copy_bw)
            except Exception as exc:  # one broken variant must not lose the others' numbers
                r = {"variant": kind, "compiled": compiled, "error": repr(exc)[:400]}
            torch.cuda.empty_cache()
            results.append(r)
            print(json.dumps(r), flush=True)
    harness.write_json(args.json, {"copy_bw_bytes_per_s": copy_bw, "results": results})
    print(harness.markdown_table(
        ["variant", "compiled", "tokens/s", "ms/token", "floor tokens/s", "of floor"],
        ([r["variant"], r["compiled"], f"failed: {r['error'][:80]}", "", "", ""] if "error" in r
         else [r["variant"], r["compiled"], f"{r['tokens_per_s']:.0f}", f"{r['ms_per_token']:.2f}",
               f"{r['floor_tokens_per_s']:.0f}", f"{100 * r['frac_of_floor']:.0f}%"]
         for r in results)))


if __name__ == "__main__":
    main()
