"""Our GGUF export read back by llama.cpp: perplexity next to torch's, and CPU decode speed.

Perplexity (export fidelity): exactly ``opt eval``'s windows (the default text tokenized by the
model's tokenizer without special tokens, the first ``--max-tokens`` cut into windows of
``--seq-len``, every token but the first of a window scored) through llama.cpp with
``logits_all`` and through torch, for the same weights:

- the package's original Q4_1 GGUF (llama.cpp) against its float conversion (torch);
- our Q4_1 export of an RTN int4 g32 asymmetric artifact against the artifact on our packed
  kernels (the codes map onto Q4_1 without re-rounding; the export stores the embedding, tied to
  the head, as Q8_0 and llama.cpp quantizes activations to 8 bits in its dot products);
- our Q8_0 export of an RTN int8 g32 symmetric artifact against that artifact.

Decode: batch 1, the same chat prompt, 128 new tokens greedy (end-of-sequence ignored, so every
run makes exactly 128), at 1 and 2 threads: torch on the float model, torch on the int4 artifact
(packed kernels), llama.cpp on the original GGUF and on our export. Each (model, threads) runs in
its own process; its warm-up and 3 timed runs hold ``/tmp/openpto-bench.lock`` (the shared CPU's
lock for timed runs); medians are reported with CPU time and the load average at the start.

    opt quantize smollm2-135m --method rtn --bits 4 --group-size 32 --asym --output A4
    opt export A4 --format gguf --type q4_1 --output A4.q4_1.gguf
    opt quantize smollm2-135m --method rtn --bits 8 --group-size 32 --sym --output A8
    opt export A8 --format gguf --type q8_0 --output A8.q8_0.gguf
    python benchmarks/llamacpp_compare.py --int4 A4 --int4-gguf A4.q4_1.gguf \
        --int8 A8 --int8-gguf A8.q8_0.gguf --json benchmarks/results/llamacpp_compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Explain what a Python decorator is, with an example."
DEFAULT = harness.DEFAULT_MODEL


# -- llama.cpp -------------------------------------------------------------------------------------


def open_llama(path: Path, threads: int, n_ctx: int, **kwargs: Any) -> Any:
    """A ``Llama`` opened the way ``opt serve --backend llamacpp`` opens it (thread counts for
    prefill and decode, weights out of the AMX buffers where the CPU advertises AMX)."""
    from openpto.engines.engine import EngineOptions
    from openpto.engines.llamacpp_backend import LlamaCppEngine

    engine = LlamaCppEngine(str(path), EngineOptions(threads=threads, context_length=n_ctx))
    engine._path = path  # what load() sets before _open(); load() would also start a worker
    return engine._open(**kwargs)


def llamacpp_perplexity(path: Path, windows: Any, threads: int) -> dict[str, Any]:
    """Perplexity of ``windows`` ([n, seq_len] token ids) from llama.cpp's own logits, with the
    same float32 log-softmax and float64 sum as ``core.metrics.perplexity``."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    n, seq_len = windows.shape
    llm = open_llama(path, threads, seq_len, logits_all=True, n_batch=seq_len, n_ubatch=seq_len)
    total = 0.0
    with harness.stopwatch() as scoring:
        for row in windows.tolist():
            llm.reset()
            llm.eval(row)  # the window alone: no BOS, no earlier context, as in opt eval
            logits = torch.from_numpy(np.array(llm.scores[:seq_len], dtype=np.float32))
            target = torch.tensor(row[1:])
            total += float(F.cross_entropy(logits[:-1], target, reduction="sum").double())
    scored = n * (seq_len - 1)
    return {"perplexity": math.exp(total / scored), "scored_tokens": scored,
            "seconds": scoring.wall}


def llamacpp_decode(path: Path, text: str, ids: list[int], new_tokens: int,
                    threads: int) -> dict[str, Any]:
    llm = open_llama(path, threads, 512)
    # Both runtimes get the same ids; this says whether llama.cpp's own tokenizer agrees.
    own = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def run(n: int) -> tuple[list[int], list[float], float]:
        stamps: list[float] = []
        tokens: list[int] = []
        # generate() would reuse the KV cache of an earlier call with the same prompt prefix;
        # reset() makes every run prefill the prompt, as torch's runs do.
        llm.reset()
        start, cpu = time.perf_counter(), time.process_time()
        # top_k=1, temp=0: greedy; llm.generate never stops at end-of-sequence by itself.
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter() - start)
            tokens.append(int(token))
            if len(tokens) == n:
                break
        return tokens, stamps, time.process_time() - cpu

    out = timed_runs(run, new_tokens,
                     detokenize=lambda t: llm.detokenize(t).decode("utf-8", "replace"))
    out["prompt_tokenized_alike"] = [int(t) for t in own] == ids
    return out


# -- torch -----------------------------------------------------------------------------------------


def torch_decode(spec: str, ids: list[int], new_tokens: int, threads: int) -> dict[str, Any]:
    import torch

    from openpto.core.generate import generate_text
    from openpto.core.sampling import SamplingParams
    from openpto.models import load_model

    torch.set_num_threads(threads)
    loaded = load_model(spec)
    model, tok = loaded.model, loaded.tokenizer

    def run(n: int) -> tuple[list[int], list[float], float]:
        cpu = time.process_time()
        result = generate_text(model, tok, ids, SamplingParams(max_tokens=n), ignore_eos=True)
        stamps = list(_cumulative(result.step_s))
        return result.token_ids, stamps, time.process_time() - cpu

    out = timed_runs(run, new_tokens, detokenize=tok.decode)
    out["kernel"] = loaded.metadata.get("kernel", "dense")
    return out


def _cumulative(steps: list[float]) -> Iterator[float]:
    total = 0.0
    for step in steps:
        total += step
        yield total


def timed_runs(run: Any, new_tokens: int, detokenize: Any, repeats: int = 3) -> dict[str, Any]:
    """A warm-up, then ``repeats`` timed runs under the lock; medians of each rate."""
    with harness.machine_lock() as load:
        run(16)  # warm-up: first-call allocations, thread pools, page faults of the weights
        runs = [run(new_tokens) for _ in range(repeats)]
    tokens = runs[0][0]
    total = [len(t) / s[-1] for t, s, _ in runs]
    decode = [(len(t) - 1) / (s[-1] - s[0]) for t, s, _ in runs]
    per_cpu = [len(t) / c for t, _, c in runs]
    return {
        "tokens": len(tokens),
        "tokens_per_second": statistics.median(total),
        "decode_tokens_per_second": statistics.median(decode),
        "ttft_ms": statistics.median(s[0] for _, s, _ in runs) * 1e3,
        "tokens_per_cpu_second": statistics.median(per_cpu),
        "all_tokens_per_second": total,
        "same_tokens_every_run": all(t == tokens for t, _, _ in runs),
        "token_ids": tokens,
        "text_start": detokenize(tokens[:40]),
        "load_average_at_start": load,
    }


# -- the comparison --------------------------------------------------------------------------------


def eval_windows(seq_len: int, max_tokens: int) -> tuple[Any, dict[str, Any]]:
    """``opt eval``'s windows of the default text, with the default model's tokenizer."""
    from transformers import AutoTokenizer

    from openpto.core.metrics import plan_windows
    from openpto.data import EVALUATION_DEFAULT, load_text, tokenize_text
    from openpto.models import hf_folder

    text = load_text(EVALUATION_DEFAULT)
    ids = tokenize_text(AutoTokenizer.from_pretrained(hf_folder(DEFAULT)), text)
    plan = plan_windows(len(ids), seq_len, max_tokens)
    windows = ids[: plan.tokens].view(plan.windows, seq_len)
    return windows, {"text": text.name, "text_sha256": text.sha256, "seq_len": seq_len,
                     "windows": plan.windows, "scored_tokens": plan.scored_tokens}


def torch_perplexity(spec: str, seq_len: int, max_tokens: int) -> dict[str, Any]:
    """``opt eval``'s own measurement, without recording a run."""
    from openpto.core.metrics import perplexity
    from openpto.data import EVALUATION_DEFAULT, load_text, tokenize_text
    from openpto.models import load_model

    loaded = load_model(spec)
    ids = tokenize_text(loaded.tokenizer, load_text(EVALUATION_DEFAULT))
    with harness.stopwatch() as scoring:
        result = perplexity(loaded.model, ids, seq_len, max_tokens=max_tokens)
    return {"perplexity": result.perplexity, "scored_tokens": result.scored_tokens,
            "seconds": scoring.wall, "cpu_seconds": scoring.cpu,
            "kernel": loaded.metadata.get("kernel", "dense")}


def chat_prompt() -> tuple[str, list[int]]:
    """The chat prompt as text and as the default tokenizer's ids (fed as ids to both runtimes)."""
    from transformers import AutoTokenizer

    from openpto.core.generate import build_chat_prompt, encode_prompt
    from openpto.models import hf_folder

    tok = AutoTokenizer.from_pretrained(hf_folder(DEFAULT))
    text = build_chat_prompt(tok, [{"role": "user", "content": PROMPT}])
    return text, encode_prompt(tok, PROMPT, chat=True)


def in_subprocess(*args: str) -> dict[str, Any]:
    """One measurement in a fresh process: torch and llama.cpp thread pools never share one."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{args}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def one(args: argparse.Namespace) -> None:
    kind, target = args.one
    if kind == "torch-ppl":
        out = torch_perplexity(target, args.seq_len, args.max_tokens)
    elif kind == "llamacpp-ppl":
        windows, _ = eval_windows(args.seq_len, args.max_tokens)
        out = llamacpp_perplexity(Path(target), windows, args.ppl_threads)
    elif kind == "torch-decode":
        out = torch_decode(target, chat_prompt()[1], args.new_tokens, args.threads)
    else:
        out = llamacpp_decode(Path(target), *chat_prompt(), args.new_tokens, args.threads)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int4", help="RTN int4 g32 asymmetric artifact folder (required)")
    parser.add_argument("--int4-gguf", help="its opt export --type q4_1 file (required)")
    parser.add_argument("--int8", help="RTN int8 g32 symmetric artifact folder")
    parser.add_argument("--int8-gguf", help="its opt export --type q8_0 file")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="(with --one) decode threads")
    parser.add_argument("--ppl-threads", type=int, default=2)
    parser.add_argument("--decode-threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts of the decode rows (others already saved are kept)")
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--json", type=Path, default=harness.result_path("llamacpp_compare"))
    parser.add_argument("--one", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    if not (args.int4 and args.int4_gguf):
        parser.error("--int4 and --int4-gguf are required")

    from openpto.models import resolve_model

    original = str(resolve_model(DEFAULT).path)
    common = ["--seq-len", str(args.seq_len), "--max-tokens", str(args.max_tokens),
              "--new-tokens", str(args.new_tokens), "--ppl-threads", str(args.ppl_threads)]
    result: dict[str, Any] = {
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "perplexity": [], "decode": [],
    }
    if args.json.is_file():  # keep what an earlier, partial run measured
        old = json.loads(args.json.read_text())
        result["perplexity"], result["decode"] = old.get("perplexity", []), old.get("decode", [])

    def save() -> None:
        harness.write_json(args.json, result)

    if not args.skip_ppl:
        _, protocol = eval_windows(args.seq_len, args.max_tokens)
        result["eval_protocol"] = protocol
        pairs = [("original Q4_1 GGUF / float conversion", original, DEFAULT),
                 ("RTN int4 g32 asym: export q4_1 / artifact", args.int4_gguf, args.int4)]
        if args.int8 and args.int8_gguf:
            pairs.append(("RTN int8 g32 sym: export q8_0 / artifact", args.int8_gguf, args.int8))
        result["perplexity"] = []
        for label, gguf_file, torch_spec in pairs:
            row = {"weights": label, "gguf": gguf_file, "torch_model": torch_spec,
                   "llamacpp": in_subprocess("--one", "llamacpp-ppl", gguf_file, *common),
                   "torch": in_subprocess("--one", "torch-ppl", torch_spec, *common)}
            row["llamacpp_vs_torch"] = (row["llamacpp"]["perplexity"]
                                        / row["torch"]["perplexity"] - 1)
            result["perplexity"].append(row)
            print(f"{label:45s} llama.cpp {row['llamacpp']['perplexity']:8.3f}  torch "
                  f"{row['torch']['perplexity']:8.3f}  {row['llamacpp_vs_torch']:+.2%}", flush=True)
            save()
    if not args.skip_decode:
        models = [("torch", "float32 (dense)", DEFAULT), ("torch", "int4 g32 artifact", args.int4),
                  ("llamacpp", "original Q4_1 GGUF", original),
                  ("llamacpp", "our q4_1 export", args.int4_gguf)]
        result["prompt"] = {"text": PROMPT, "chat": True, "tokens": len(chat_prompt()[1])}
        for threads in args.decode_threads:
            for runtime, label, target in models:
                row = {"runtime": runtime, "model": label, "path": target, "threads": threads,
                       **in_subprocess("--one", f"{runtime}-decode", target, *common,
                                       "--threads", str(threads))}
                # a new measurement replaces the old row of the same runtime, model and threads
                result["decode"] = [
                    r for r in result["decode"]
                    if (r["runtime"], r["model"], r["threads"]) != (runtime, label, threads)
                ] + [row]
                print(f"{threads} thr  {runtime:8s} {label:22s} "
                      f"{row['decode_tokens_per_second']:7.1f} tok/s decode  "
                      f"{row['tokens_per_second']:7.1f} tok/s total  "
                      f"load {row['load_average_at_start'][0]}", flush=True)
                save()
    save()
    print_tables(result)


def print_tables(result: dict[str, Any]) -> None:
    if result["perplexity"]:
        print()
        print(harness.markdown_table(
            ["weights", "llama.cpp", "torch", "llama.cpp vs torch"],
            ([row["weights"], f"{row['llamacpp']['perplexity']:.3f}",
              f"{row['torch']['perplexity']:.3f}", f"{row['llamacpp_vs_torch']:+.2%}"]
             for row in result["perplexity"])))
    if result["decode"]:
        print()
        print(harness.markdown_table(
            ["runtime", "model", "threads", "decode tok/s", "tok/s incl. prefill", "tok/CPU-s",
             "load at start"],
            ([row["runtime"], row["model"], row["threads"],
              f"{row['decode_tokens_per_second']:.1f}", f"{row['tokens_per_second']:.1f}",
              f"{row['tokens_per_cpu_second']:.1f}", row["load_average_at_start"][0]]
             for row in result["decode"])))

if __name__ == "__main__":
    main()
