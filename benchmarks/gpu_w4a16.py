"""W4A16 Triton kernels against bf16 F.linear (and torch's tinygemm int4) on Llama-3-8B shapes.

Run on a CUDA machine from the repository root:

    PYTHONPATH=src python benchmarks/gpu_w4a16.py --tune --json w4a16.json

Correctness first: every launch is checked against a float32 reference on fresh random data with
the output pre-filled with NaN (so an unwritten element fails). Then device time per call (CUDA
events, L2 flushed by reading 256 MB, median; see ``openpto.kernels.triton.timing``) and host
time per call, separately. ``--tune`` times a small set of launch shapes per layer shape and token
count and reports the fastest (paste them into ``openpto/kernels/triton/tuned.py``).
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
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 2048]
GROUP = 128
ERR_LIMIT = 1e-2


def make_weight(n: int, k: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // GROUP, generator=g) * 0.004 + 0.001
    zero = torch.randint(0, 16, (n, k // GROUP), generator=g).float()
    # the layout functions are plain torch: packing on the GPU takes milliseconds
    packed = gd.pack_w4a16(q.cuda(), scale.cuda(), zero.cuda(), GROUP)
    w_ref = gd.dequantize_w4a16(packed["qweight"], packed["sz"])
    return {"q": q, "scale": scale, "zero": zero, **packed, "w_ref": w_ref}


def split_options(n_blocks: int, kblocks: int, sms: int, limit: int = 4) -> list[int]:
    """Divisors of the kblock count that give about 1, 2, 4 and 8 programs per multiprocessor."""
    divs = [d for d in range(1, kblocks + 1) if kblocks % d == 0]
    picked: list[int] = []
    for waves in (1, 2, 4, 8):
        best = min(divs, key=lambda d: abs(n_blocks * d - waves * sms))
        if best not in picked:
            picked.append(best)
    return picked[:limit]


def candidates(n: int, k: int, m: int, sms: int) -> list[Launch]:
    kb = k // gd.KBLOCK
    out: list[Launch] = []
    if m <= 4:
        # BN = 128 outputs per warp, so a thread's rows never leave its registers
        for bn, warps in ((256, 2), (512, 4), (1024, 8)):
            for rows, prefetch in ((16, False), (8, False), (8, True)):
                if m > 1 and (rows == 16 or bn == 1024):
                    continue
                for split in split_options(-(-n // bn), kb, sms, 3):
                    out.append(Launch("gemv", bn, min(m, 2), split, warps, 1, rows, prefetch))
        # atomic split-K: the fix-up no longer grows with the split, so split down to 1-2 kblocks;
        # smaller tiles (4 rows) and software pipelining (stages 3) trade registers for warps
        for bn, warps in ((256, 2), (512, 4)):
            for rows, prefetch, stages in ((16, False, 1), (8, True, 1), (8, False, 3),
                                           (4, True, 1), (4, False, 3)):
                for split in (kb, kb // 2, kb // 4):
                    out.append(
                        Launch("gemv", bn, min(m, 2), split, warps, stages, rows, prefetch, True)
                    )
    if 2 <= m <= 64:
        bm = max(16, 1 << (m - 1).bit_length())
        for bn in (64, 128):
            splits = split_options(-(-n // bn), kb, sms, 3) if m <= bm else [1]
            for split in splits:
                out.append(Launch("dot", bn, bm, split, 4, 2))
    if m >= 32:
        out.append(Launch("dot", 128, 128 if m >= 128 else 64, 1, 8, 3))
        out.append(Launch("dequant", 256))
    return out


def _run_jobs(jobs: list[tuple[int, int, int, dict[str, Any]]]) -> int:
    """Worker: compile (by running once) every launch in ``jobs``; triton caches them on disk."""
    from openpto.kernels.triton import w4a16

    weights: dict[tuple[int, int], dict[str, Any]] = {}
    for n, k, m, launch in jobs:
        if (n, k) not in weights:
            weights[(n, k)] = make_weight(n, k, seed=n + k)
        wt = weights[(n, k)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w4a16.w4a16_matmul(x, wt["qweight"], wt["sz"], GROUP, Launch(**launch))
    torch.cuda.synchronize()
    return len(jobs)


def precompile(jobs: list[tuple[int, int, int, Launch]], workers: int) -> None:
    # jobs that share a compiled kernel go to one worker, so each kernel compiles once
    groups: dict[tuple[Any, ...], list[tuple[int, int, int, dict[str, Any]]]] = {}
    for n, k, m, la in jobs:
        key = (
            la.rows,
            la.prefetch,
            la.atomic,
            la.path,
            la.block_m,
            la.block_n,
            la.num_warps,
            la.num_stages,
            (la.split_k - 1).bit_length(),
            m == 1,
            m % 16 == 0,
        )
        groups.setdefault(key, []).append((n, k, m, la.to_dict()))
    chunks: list[list[tuple[int, int, int, dict[str, Any]]]] = [[] for _ in range(workers)]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(chunks, key=len).extend(group)
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_run_jobs, [c for c in chunks if c]))


def probe(path: str) -> None:
    """Where the 1-token time goes: the chosen GEMV against a kernel that only reads the same
    packed words with the same grid (no decode, no split-K fix-up), with the words' natural row
    stride and with a padded one (DRAM channel camping on power-of-two strides), and against a
    plain torch read of the same bytes."""
    import triton
    import triton.language as tl

    from openpto.kernels.triton import tuned, w4a16
    from openpto.kernels.triton.timing import copy_bandwidth

    @triton.jit
    def read_only(qw_ptr, out_ptr, N, stride, KBP, BN: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_r = tl.arange(0, 16)
        acc = tl.zeros([16, BN], tl.float32)
        for i in range(KBP):
            rows = (pid_k * KBP + i) * 16 + offs_r
            w = tl.load(qw_ptr + rows[:, None] * stride + offs_n[None, :], mask=offs_n[None, :] < N)
            acc += w.to(tl.float32)
        tl.store(out_ptr + pid_k * N + offs_n, tl.sum(acc, axis=0), mask=offs_n < N)

    timer = harness.device_timer()
    copy_bw = copy_bandwidth()
    rows: list[dict[str, Any]] = []
    for n, k in SHAPES:
        wt = make_weight(n, k, seed=1)
        launch = gd.choose_w4a16(1, n, k, tuned.W4A16)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        kbp = k // gd.KBLOCK // launch.split_k
        grid = (triton.cdiv(n, launch.block_n), launch.split_k)
        out = torch.empty(launch.split_k, n, device="cuda")
        padded = torch.empty(k // 8, n + 64, dtype=torch.int32, device="cuda")
        padded[:, :n] = wt["qweight"]
        row: dict[str, Any] = {"out": n, "in": k, "launch": launch.to_dict()}
        row["gemv_us"] = (
            1e6
            * timer.device_time(
                partial(w4a16.w4a16_matmul, x, wt["qweight"], wt["sz"], GROUP, launch)
            )[0]
        )
        for name, q, stride in (("read_us", wt["qweight"], n), ("read_padded_us", padded, n + 64)):
            fn = partial(
                read_only[grid],
                q,
                out,
                n,
                stride,
                kbp,
                BN=launch.block_n,
                num_warps=launch.num_warps,
            )
            row[name] = 1e6 * timer.device_time(fn)[0]
        flat = wt["qweight"].view(-1).view(torch.float32)
        row["torch_sum_us"] = 1e6 * timer.device_time(partial(torch.sum, flat))[0]
        empty = torch.empty(0, device="cuda")
        row["empty_op_us"] = 1e6 * timer.device_time(partial(torch.neg, empty))[0]
        for key in ("gemv_us", "read_us", "read_padded_us", "torch_sum_us"):
            row[key.replace("_us", "_bw_frac")] = n * k / 2 / (row[key] * 1e-6) / copy_bw
        rows.append(row)
        print(json.dumps(row), flush=True)
    harness.write_json(path, {"copy_bw_bytes_per_s": copy_bw, "rows": rows})


def ncu_target() -> None:
    """A few launches of the 1-token GEMV on 4096x14336, for ``ncu``."""
    from openpto.kernels.triton import tuned, w4a16

    wt = make_weight(4096, 14336, seed=1)
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    launch = gd.choose_w4a16(1, 4096, 14336, tuned.W4A16)
    for _ in range(4):
        w4a16.w4a16_matmul(x, wt["qweight"], wt["sz"], GROUP, launch)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune", action="store_true", help="time candidate launches, keep the best")
    ap.add_argument("--json", default=str(harness.result_path("gpu_w4a16")),
                    help="where to write the results")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--probe", default=None, help="only run the read-only probe; JSON path")
    ap.add_argument("--ncu-target", action="store_true", help="only launch the GEMV (for ncu)")
    args = ap.parse_args()
    if args.probe:
        return probe(args.probe)
    if args.ncu_target:
        return ncu_target()

    from openpto.kernels.triton import tuned, w4a16
    from openpto.kernels.triton.timing import copy_bandwidth, rel_error

    tokens = [int(t) for t in args.tokens.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = harness.device_timer()
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, {sms} SMs\ncopy bandwidth {copy_bw / 1e12:.2f} TB/s",
          flush=True)

    if args.tune:
        jobs = [(n, k, m, c) for n, k in SHAPES for m in tokens for c in candidates(n, k, m, sms)]
        print(f"compiling {len(jobs)} launches on {args.workers} processes", flush=True)
        precompile(jobs, args.workers)

    results: list[dict[str, Any]] = []
    tried: list[dict[str, Any]] = []  # every tuning candidate's time: the evidence for the choice
    chosen: dict[str, dict[str, Any]] = {}
    for n, k in SHAPES:
        wt = make_weight(n, k, seed=n * 7 + k)
        w_bf16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        nb_int4 = n * k // 2
        nb_sz = wt["sz"].numel() * 4
        tiny = None
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wt["w_ref"].t()
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

            def run(
                launch: Launch, x: torch.Tensor = x, out: torch.Tensor = out, wt: Any = wt
            ) -> torch.Tensor:
                return w4a16.w4a16_matmul(x, wt["qweight"], wt["sz"], GROUP, launch, out=out)

            def check(
                launch: Launch,
                x: torch.Tensor = x,
                ref: torch.Tensor = ref,
                out: torch.Tensor = out,
            ) -> float:
                out.fill_(float("nan"))
                y = run(launch)
                return rel_error(y, ref)

            if args.tune:
                best: tuple[float, Launch] | None = None
                for cand in candidates(n, k, m, sms):
                    err = check(cand)
                    if not err < ERR_LIMIT:
                        print(f"  REJECT {n}x{k} m={m} {cand}: error {err}", flush=True)
                        continue
                    t, _ = timer.device_time(partial(run, cand), reps=max(15, args.reps // 3))
                    tried.append({"tokens": m, "out": n, "in": k, "us": t * 1e6, **cand.to_dict()})
                    if best is None or t < best[0]:
                        best = (t, cand)
                assert best is not None, f"no launch passed for {n}x{k} m={m}"
                launch = best[1]
            else:
                launch = gd.choose_w4a16(m, n, k, tuned.W4A16)
            chosen[f"{n},{k},{gd.token_bucket(m)}"] = launch.to_dict()

            err = check(launch)
            y1 = run(launch).clone()
            deterministic = bool(torch.equal(y1, run(launch)))
            ours = timer.time(partial(run, launch), reps=args.reps)
            dense = timer.time(partial(F.linear, x, w_bf16), reps=args.reps)
            row: dict[str, Any] = {
                "out": n,
                "in": k,
                "tokens": m,
                "launch": launch.to_dict(),
                "rel_error": err,
                "deterministic": deterministic,
                "ours": ours.to_dict(),
                "bf16": dense.to_dict(),
                "speedup_vs_bf16": dense.device_s / ours.device_s,
                "int4_bytes_bw_frac": nb_int4 / ours.device_s / copy_bw,
                "all_weight_bytes_bw_frac": (nb_int4 + nb_sz) / ours.device_s / copy_bw,
                "bf16_bw_frac": n * k * 2 / dense.device_s / copy_bw,
            }
            if m <= 128:
                if tiny is None:
                    tiny = _tinygemm_buffers(wt)
                tg = tiny
                int4mm = torch.ops.aten._weight_int4pack_mm
                row["tinygemm"] = timer.time(
                    partial(int4mm, x, tg[0], GROUP, tg[1]), reps=args.reps
                ).to_dict()
            results.append(row)
            print(_line(row), flush=True)
        torch.cuda.empty_cache()

        _save(args.json, copy_bw, chosen, results, tried)  # after each shape: a timeout keeps these
    print(_table(results))


def _save(path: str, copy_bw: float, chosen: Any, results: Any, tried: Any) -> None:
    harness.write_json(path, {"copy_bw_bytes_per_s": copy_bw, "chosen": chosen,
                              "results": results, "candidates": tried})


def _tinygemm_buffers(wt: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    q = wt["q"].cuda()
    nibbles = ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, 8)
    scale, zero = wt["scale"].double(), wt["zero"].double()
    sz = torch.stack([scale, (8.0 - zero) * scale], -1).transpose(0, 1).contiguous()
    return packed, sz.to(torch.bfloat16).cuda()


def _line(r: dict[str, Any]) -> str:
    tg = r.get("tinygemm", {}).get("device_us", float("nan"))
    return (
        f"{r['out']:>6}x{r['in']:<6} m={r['tokens']:<5} ours {r['ours']['device_us']:8.1f} us "
        f"(host {r['ours']['host_us']:5.1f})  bf16 {r['bf16']['device_us']:8.1f}  tinygemm "
        f"{tg:8.1f}  x{r['speedup_vs_bf16']:.2f}  bw {100 * r['int4_bytes_bw_frac']:5.1f}%  "
        f"err {r['rel_error']:.1e}  {r['launch']['path']}"
    )


def _table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        tg = r.get("tinygemm", {}).get("device_us")
        la = r["launch"]
        rows.append([
            f"{r['out']}x{r['in']}", r["tokens"], f"{r['ours']['device_us']:.1f}",
            f"{r['bf16']['device_us']:.1f}", "-" if tg is None else f"{tg:.1f}",
            f"{r['speedup_vs_bf16']:.2f}x", f"{100 * r['int4_bytes_bw_frac']:.0f}%",
            f"{r['ours']['host_us']:.0f}", f"{r['rel_error']:.1e}",
            f"{la['path']} bn{la['block_n']} bm{la['block_m']} s{la['split_k']} "
            f"w{la['num_warps']} st{la['num_stages']}",
        ])
    return harness.markdown_table(
        ["layer (out x in)", "tokens", "ours (us)", "bf16 F.linear (us)", "tinygemm (us)",
         "vs bf16", "int4 bytes / copy BW", "host us/call", "rel. error", "launch"], rows)


if __name__ == "__main__":
    main()
