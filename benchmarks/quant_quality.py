"""Quantization quality and calibration time on the default model (CPU).

128 calibration windows of 512 tokens from the default calibration text (pydoc-topics), perplexity
on the default evaluation text (stdlib-docstrings, no shared text) in windows of 512: the float
model, RTN int8 per-channel, RTN int4 g64 asym/sym, GPTQ w4 g64, AWQ w4 g64 (and GPTQ/AWQ at g32
for reference: the default model's weights already lie on a Q4_1 g32 grid, so g32 flatters every
method; judge at g64). Then the GPTQ w4 g64 artifact is written through ``quantize_model`` and
loaded in a fresh process to measure resident memory and greedy decode speed against the float
model (each in its own process, so one's memory does not count in the other's).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/quant_quality.py --eval-tokens 8192 \
        --json benchmarks/results/quant_quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import harness
import torch

ROOT = harness.ROOT

# The targets first (the machine is shared: partial results are saved after every row).
CONFIGS = [
    ("RTN int8 per-channel sym", "rtn", dict(bits=8, group_size=None, symmetric=True)),
    ("RTN int4 g64 asym", "rtn", dict(bits=4, group_size=64, symmetric=False)),
    ("GPTQ int4 g64 asym", "gptq", dict(bits=4, group_size=64, symmetric=False)),
    ("AWQ int4 g64 asym", "awq", dict(bits=4, group_size=64, symmetric=False)),
    ("RTN int4 g64 sym", "rtn", dict(bits=4, group_size=64, symmetric=True)),
    ("GPTQ int4 g64 sym", "gptq", dict(bits=4, group_size=64, symmetric=True)),
    ("RTN int4 g32 asym (on-grid)", "rtn", dict(bits=4, group_size=32, symmetric=False)),
    ("GPTQ int4 g32 asym (on-grid)", "gptq", dict(bits=4, group_size=32, symmetric=False)),
]
#: rows run only with --reference: the default model's own Q4_1 g32 grid flatters every method
REFERENCE = "on-grid"
#: the row whose quantized weights are saved as an artifact for the memory and decode measurement
ARTIFACT_ROW = "GPTQ int4 g64 asym"

DECODE_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {benchmarks!r})
import harness  # puts the checkout's src first on the path
from openpto.models import load_model
torch.set_num_threads({threads})
loaded = load_model({spec!r})
model, tok = loaded.model, loaded.tokenizer
rss = int(open("/proc/self/statm").read().split()[1]) * 4096
messages = [{{"role": "user", "content": "Explain what a Python decorator is, with an example."}}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids

@torch.no_grad()
def greedy(n):
    out = model(ids, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tokens = [int(nxt)]
    with harness.stopwatch() as decode:
        for _ in range(n - 1):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(int(nxt))
    # CPU time is the steadier figure on a shared machine: wall time counts other jobs' turns.
    return (n - 1) / decode.wall, tokens, (n - 1) / decode.cpu

greedy(8)  # warm-up
runs = [greedy({new_tokens}) for _ in range({repeats})]
# Resident after decoding, when every weight page has been touched (mmapped float weights are
# not resident until read, so a figure taken right after loading flatters the float model).
rss = {{k.split(":")[0]: int(k.split()[1]) * 1024 for k in open("/proc/self/smaps_rollup")
        if k.split(":")[0] in ("Rss", "Anonymous")}}["Rss"]
speeds = sorted(r[0] for r in runs)
per_cpu = sorted(r[2] for r in runs)
print(json.dumps({{"rss_bytes": rss, "weight_bytes": loaded.weight_bytes,
                  "decode_tokens_per_second": speeds[len(speeds) // 2],
                  "decode_tokens_per_cpu_second": per_cpu[len(per_cpu) // 2],
                  "kernel": loaded.metadata.get("kernel", "dense"),
                  "prompt_tokens": int(ids.shape[1]),
                  "text": tok.decode(runs[0][1][:40])}}))
"""


def decode_in_subprocess(spec: str, threads: int, new_tokens: int, repeats: int) -> dict:
    code = DECODE_SCRIPT.format(
        benchmarks=str(ROOT / "benchmarks"), spec=spec, threads=threads, new_tokens=new_tokens,
        repeats=repeats,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--only", nargs="*", help="labels (substrings) to run")
    parser.add_argument("--reference", action="store_true", help="also run the g32 rows")
    parser.add_argument("--float-ppl", type=float,
                        help="reuse a float perplexity measured on the same tokens")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--decode-only", metavar="ARTIFACT",
                        help="only measure memory and decode: the float model against ARTIFACT")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", default=str(harness.result_path("quant_quality")))
    args = parser.parse_args()
    if args.decode_only:
        threads = torch.get_num_threads()
        decode = {"artifact": {"path": args.decode_only}}
        for key, spec in (("float", "smollm2-135m"), ("int4", args.decode_only)):
            decode[key] = decode_in_subprocess(spec, threads, args.new_tokens, 3)
            print(key, json.dumps(decode[key]), flush=True)
        save(args, [], decode, threads)
        return

    from openpto.api import quantize_
    from openpto.config import registered_config_types
    from openpto.core.metrics import perplexity
    from openpto.data import (
        CALIBRATION_DEFAULT,
        EVALUATION_DEFAULT,
        calibration_batches,
        load_text,
        tokenize_text,
    )
    from openpto.models import load_model
    from openpto.pipeline.artifacts import as_stored, folder_size, scale_dtype_for, write_artifact

    threads = torch.get_num_threads()
    loaded = load_model(None)
    tok = loaded.tokenizer
    calib = calibration_batches(tok, load_text(None, default=CALIBRATION_DEFAULT), args.samples,
                                args.calib_seq_len, seed=0)
    eval_ids = tokenize_text(tok, load_text(None, default=EVALUATION_DEFAULT))
    rows: list[dict] = []
    artifact = Path(os.environ.get("OPT_HOME", Path.home() / ".openpto")) / "bench-gptq-w4g64"

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, eval_ids, 512, max_tokens=args.eval_tokens).perplexity

    with harness.stopwatch() as evaluation:
        base = args.float_ppl if args.float_ppl else ppl(loaded.model)
    rows.append({"setting": "float32 (no quantization)", "perplexity": base, "seconds": 0.0,
                 "eval_seconds": evaluation.wall, "reused": bool(args.float_ppl)})
    print(f"{'float32':45s} ppl {base:8.3f}", flush=True)
    import openpto.core.quant  # noqa: F401  (registers the method configs)

    types = registered_config_types()
    for label, method, kwargs in CONFIGS:
        if args.only and not any(s in label for s in args.only):
            continue
        if REFERENCE in label and not args.reference:
            continue
        model = copy.deepcopy(loaded.model)
        config = types[method](**kwargs)
        with harness.stopwatch() as quantization:
            result = quantize_(model, config, None if method == "rtn" else calib, device="cpu")
        seconds = quantization.wall
        value = ppl(model)
        rows.append({"setting": label, "method": method, **kwargs, "perplexity": value,
                     "delta_percent": 100 * (value / base - 1), "seconds": seconds,
                     "load_average": os.getloadavg()})
        print(f"{label:45s} ppl {value:8.3f} ({100 * (value / base - 1):+6.2f}%) "
              f"calibration+quantization {seconds:7.1f} s", flush=True)
        if label == ARTIFACT_ROW and not args.skip_decode:
            scale_dtype = scale_dtype_for(loaded.dtype)
            stored = {n: as_stored(q, scale_dtype) for n, q in result.quantized_weights().items()}
            write_artifact(model, tok, artifact, stored, {"source_model": loaded.name,
                                                          "method_config": config.to_dict()})
        del model, result
        save(args, rows, {}, threads)

    decode: dict = {}
    if not args.skip_decode and artifact.is_dir():
        decode["artifact"] = {"path": str(artifact), "size_bytes": folder_size(artifact)}
        decode["float"] = decode_in_subprocess("smollm2-135m", threads, args.new_tokens, 3)
        decode["int4"] = decode_in_subprocess(str(artifact), threads, args.new_tokens, 3)
        for key in ("float", "int4"):
            d = decode[key]
            print(f"decode {key:6s} {d['decode_tokens_per_second']:6.1f} tok/s  RSS "
                  f"{d['rss_bytes'] / 2**20:7.1f} MiB  weights {d['weight_bytes'] / 2**20:7.1f} MiB"
                  f"  kernel {d['kernel']}", flush=True)
    save(args, rows, decode, threads)
    print(f"saved {args.json}")


def save(args: argparse.Namespace, rows: list[dict], decode: dict, threads: int) -> None:
    from openpto.data import CALIBRATION_DEFAULT, EVALUATION_DEFAULT

    result = {
        "threads": threads,
        "load_average": os.getloadavg(),
        "calibration": {"text": CALIBRATION_DEFAULT, "samples": args.samples,
                        "seq_len": args.calib_seq_len, "seed": 0},
        "evaluation": {"text": EVALUATION_DEFAULT, "seq_len": 512, "tokens": args.eval_tokens},
        "rows": rows,
        "decode": decode,
    }
    harness.write_json(args.json, result)


if __name__ == "__main__":
    main()
