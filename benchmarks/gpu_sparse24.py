"""Compressed 2:4 Triton kernels (bf16 and int4 values) on Llama-3-8B shapes, 1-16 tokens.

Run on a CUDA machine from the repository root, after ``gpu_w4a16.py`` (whose chosen launches it
reads, so that 2:4+int4 is compared with the best dense int4 launch):

    PYTHONPATH=src python benchmarks/gpu_sparse24.py --tune --w4a16-json w4a16.json --json s24.json

bf16 2:4 is compared with dense bf16 ``F.linear`` on the same masked weight; int4 2:4 with our
dense W4A16 kernel on the same codes. Correctness, timing and tuning as in ``gpu_w4a16.py``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
from functools import partial
from typing import Any

import harness
import torch
import torch.nn.functional as F

from openpto.kernels import gpu_dispatch as gd
from openpto.kernels.gpu_dispatch import Launch

_FUSED = harness.linear_shapes(harness.LLAMA3_8B, fused=True)
SHAPES = [_FUSED[name] for name in ("o", "qkv", "gate/up", "down")]  # (out N, in K)
TOKENS = [1, 2, 4, 8, 16]
GROUP = 128
ERR_LIMIT = 1e-2


def make_weights(n: int, k: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, pos, True).reshape(n, k)
    keep = keep.cuda()
    w = (torch.randn(n, k, generator=g) * 0.02).cuda() * keep
    c = gd.compress_24(w)  # plain torch: compressing on the GPU takes milliseconds
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g).cuda()
    scale = (torch.rand(n, k // GROUP, generator=g) * 0.004 + 0.001).cuda()
    zero = torch.randint(0, 16, (n, k // GROUP), generator=g).float().cuda()
    ci = gd.compress_24_int4(q, scale, zero, GROUP, mask=keep)
    return {
        "w_bf16": w.to(torch.bfloat16),
        "bf16": c,
        "int4": ci,
        "dense_int4": gd.pack_w4a16(q, scale, zero, GROUP),
        "ref_bf16": gd.decompress_24(c["values"], c["meta"]).float(),
        "ref_int4": gd.dequantize_24_int4(ci["values"], ci["meta"], ci["sz"]),
    }


def split_options(n_blocks: int, kblocks: int, sms: int, limit: int = 4) -> list[int]:
    divs = [d for d in range(1, kblocks + 1) if kblocks % d == 0]
    picked: list[int] = []
    for waves in (1, 2, 4, 8):
        best = min(divs, key=lambda d: abs(n_blocks * d - waves * sms))
        if best not in picked:
            picked.append(best)
    return picked[:limit]


def candidates(n: int, k: int, m: int, sms: int) -> list[Launch]:
    out = []
    for bn, warps in ((256, 2), (512, 4)):
        for split in split_options(-(-n // bn), k // gd.KBLOCK, sms, 3):
            out.append(Launch("gemv", bn, min(m, 2), split, warps, 1))
    return out


def _run(kind: str, wt: dict[str, Any], x: torch.Tensor, launch: Launch, out: Any = None) -> Any:
    from openpto.kernels.triton import sparse24

    b = wt[kind]
    sz = b.get("sz")
    return sparse24.sparse24_matmul(x, b["values"], b["meta"], launch, sz, GROUP, out=out)


def _run_jobs(jobs: list[tuple[int, int, int, str, dict[str, Any]]]) -> int:
    weights: dict[tuple[int, int], dict[str, Any]] = {}
    for n, k, m, kind, launch in jobs:
        if (n, k) not in weights:
            weights[(n, k)] = make_weights(n, k, seed=n + k)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        _run(kind, weights[(n, k)], x, Launch(**launch))
    torch.cuda.synchronize()
    return len(jobs)


def precompile(jobs: list[tuple[int, int, int, str, Launch]], workers: int) -> None:
    # jobs that share a compiled kernel go to one worker, so each kernel compiles once
    groups: dict[tuple[Any, ...], list[tuple[int, int, int, str, dict[str, Any]]]] = {}
    for n, k, m, kind, la in jobs:
        key = (
            kind,
            la.block_m,
            la.block_n,
            la.num_warps,
            (la.split_k - 1).bit_length(),
            m == 1,
            m % 16 == 0,
        )
        groups.setdefault(key, []).append((n, k, m, kind, la.to_dict()))
    chunks: list[list[tuple[int, int, int, str, dict[str, Any]]]] = [[] for _ in range(workers)]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(chunks, key=len).extend(group)
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_run_jobs, [c for c in chunks if c]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--json", default=str(harness.result_path("gpu_sparse24")))
    ap.add_argument("--w4a16-json", default=None, help="gpu_w4a16.py output: its chosen launches")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    args = ap.parse_args()

    from openpto.kernels.triton import tuned, w4a16
    from openpto.kernels.triton.timing import copy_bandwidth, rel_error

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = harness.device_timer()
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, {sms} SMs\ncopy bandwidth {copy_bw / 1e12:.2f} TB/s",
          flush=True)
    dense_launch: dict[str, Launch] = {}
    if args.w4a16_json:
        with open(args.w4a16_json) as f:
            dense_launch = {key: Launch(**v) for key, v in json.load(f)["chosen"].items()}

    if args.tune:
        jobs = [
            (n, k, m, kind, c)
            for n, k in SHAPES
            for m in TOKENS
            for kind in ("bf16", "int4")
            for c in candidates(n, k, m, sms)
        ]
        print(f"compiling {len(jobs)} launches on {args.workers} processes", flush=True)
        precompile(jobs, args.workers)

    results: list[dict[str, Any]] = []
    chosen: dict[str, dict[str, Any]] = {}
    for n, k in SHAPES:
        wt = make_weights(n, k, seed=n * 3 + k)
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            for kind in ("bf16", "int4"):
                ref = x.float() @ wt[f"ref_{kind}"].t()

                def check(
                    launch: Launch,
                    kind: str = kind,
                    x: torch.Tensor = x,
                    ref: torch.Tensor = ref,
                    out: torch.Tensor = out,
                    wt: Any = wt,
                ) -> float:
                    out.fill_(float("nan"))
                    return rel_error(_run(kind, wt, x, launch, out), ref)

                if args.tune:
                    best: tuple[float, Launch] | None = None
                    for cand in candidates(n, k, m, sms):
                        err = check(cand)
                        if not err < ERR_LIMIT:
                            print(f"  REJECT {kind} {n}x{k} m={m} {cand}: {err}", flush=True)
                            continue
                        t, _ = timer.device_time(
                            partial(_run, kind, wt, x, cand),
                            reps=max(15, args.reps // 3),
                        )
                        if best is None or t < best[0]:
                            best = (t, cand)
                    assert best is not None
                    launch = best[1]
                else:
                    launch = gd.choose_24(m, n, k, kind, tuned.SPARSE24)
                chosen[f"{kind},{n},{k},{gd.token_bucket(m)}"] = launch.to_dict()
                err = check(launch)
                ours = timer.time(partial(_run, kind, wt, x, launch), reps=args.reps)
                if kind == "bf16":
                    base = timer.time(partial(F.linear, x, wt["w_bf16"]), reps=args.reps)
                    base_name = "dense bf16 F.linear"
                    nbytes = wt["bf16"]["values"].numel() * 4 + wt["bf16"]["meta"].numel() * 4
                else:
                    dl = dense_launch.get(f"{n},{k},{gd.token_bucket(m)}") or gd.choose_w4a16(
                        m, n, k, tuned.W4A16
                    )
                    di = wt["dense_int4"]
                    dense_int4 = partial(w4a16.w4a16_matmul, x, di["qweight"], di["sz"], GROUP, dl)
                    base = timer.time(dense_int4, reps=args.reps)
                    base_name = "our dense W4A16"
                    nbytes = sum(wt["int4"][key].numel() * 4 for key in ("values", "meta", "sz"))
                row = {
                    "values": kind,
                    "out": n,
                    "in": k,
                    "tokens": m,
                    "launch": launch.to_dict(),
                    "rel_error": err,
                    "ours": ours.to_dict(),
                    "baseline": base_name,
                    "base": base.to_dict(),
                    "speedup": base.device_s / ours.device_s,
                    "bytes": nbytes,
                    "bw_frac": nbytes / ours.device_s / copy_bw,
                }
                results.append(row)
                print(
                    f"{kind} {n:>6}x{k:<6} m={m:<3} ours {ours.device_s * 1e6:7.1f} us (host "
                    f"{ours.host_s * 1e6:5.1f}) {base_name} {base.device_s * 1e6:7.1f} "
                    f"x{row['speedup']:.2f} bw {100 * row['bw_frac']:4.1f}% err {err:.1e}",
                    flush=True,
                )
        torch.cuda.empty_cache()
        harness.write_json(args.json, {  # after each shape: a timeout keeps these
            "copy_bw_bytes_per_s": copy_bw, "chosen": chosen, "results": results})
    harness.write_json(args.json, {"copy_bw_bytes_per_s": copy_bw, "chosen": chosen,
                                   "results": results})
    print(harness.markdown_table(
        ["values", "layer", "tokens", "ours (us)", "baseline", "baseline (us)", "speedup",
         "bytes / copy BW", "rel. error"],
        ([r["values"], f"{r['out']}x{r['in']}", r["tokens"], f"{r['ours']['device_us']:.1f}",
          r["baseline"], f"{r['base']['device_us']:.1f}", f"{r['speedup']:.2f}x",
          f"{100 * r['bw_frac']:.0f}%", f"{r['rel_error']:.1e}"] for r in results)))


if __name__ == "__main__":
    main()
