"""Single-stream decode rate of the server against the library's ``generate``, same model.

Both paths get the same prompt token ids (the default chat prompt through the model's chat
template) and decode greedily up to ``--new-tokens`` tokens:

- ``generate``: the public ``openpto.pipeline.generate.generate`` (what ``opt generate`` runs),
  timed by its own records: decode tokens/s = (tokens - 1) / (last token - first token).
- ``serve``: the app ``opt serve`` runs (``create_app`` over a torch engine holding the same loaded
  model) under uvicorn on a loopback port, one streaming ``/v1/completions`` request at a time
  through httpx with the prompt as token ids; timed at the client from the first to the last SSE
  text chunk, token count from ``stream_options.include_usage``.

One warm-up request per path, then ``--repeats`` rounds alternating the two paths (so a change
of load on a shared machine hits both alike); medians are reported, with min and max. The
greedy text of both paths is compared exactly. CUDA is synchronised by the token reads that
time each step (both paths read every token id to the host).

    python benchmarks/serve_vs_generate.py                     # default model, CPU
    python benchmarks/serve_vs_generate.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def run_generate(loaded: Any, new_tokens: int) -> dict[str, Any]:
    from openpto.pipeline.generate import GenerationConfig, generate

    stream = generate(loaded, GenerationConfig(prompt=PROMPT, max_new_tokens=new_tokens))
    records = list(stream)
    timed = [r for r in records if r.token_id is not None]
    first, last = timed[0], timed[-1]
    decode = last.elapsed_s - first.elapsed_s
    return {"text": "".join(r.text for r in records), "tokens": len(timed),
            "prompt_tokens": first.prompt_tokens, "ttft_ms": first.ttft_s * 1e3,
            "decode_tokens_per_second": (len(timed) - 1) / decode if decode > 0 else 0.0}


def run_serve(url: str, model: str, ids: list[int], new_tokens: int) -> dict[str, Any]:
    import httpx

    body = {"model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    texts: list[str] = []
    stamps: list[float] = []
    usage: dict[str, int] = {}
    started = time.perf_counter()
    with httpx.Client(timeout=600) as client, \
            client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices", []):
                if choice.get("text"):
                    stamps.append(time.perf_counter())
                    texts.append(choice["text"])
    tokens = int(usage["completion_tokens"])
    decode = stamps[-1] - stamps[0]
    return {"text": "".join(texts), "tokens": tokens, "prompt_tokens": usage["prompt_tokens"],
            "ttft_ms": (stamps[0] - started) * 1e3,
            "decode_tokens_per_second": (tokens - 1) / decode if decode > 0 else 0.0}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["decode_tokens_per_second"] for r in runs]
    ttfts = [r["ttft_ms"] for r in runs]
    return {"decode_tokens_per_second": statistics.median(rates),
            "decode_tokens_per_second_spread": [min(rates), max(rates)],
            "ttft_ms": statistics.median(ttfts), "tokens": [r["tokens"] for r in runs],
            "runs": [{k: v for k, v in r.items() if k != "text"} for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="MODEL (default: the default model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both paths (default: torch's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/serve_vs_generate_DEVICE.json)")
    args = parser.parse_args()

    import torch

    from openpto.engines.engine import EngineOptions
    from openpto.engines.torch_backend import TorchEngine
    from openpto.models import DEFAULT_ALIAS, load_model
    from openpto.serving import ServerSettings, create_app
    from openpto.serving.background import BackgroundServer

    # Runs go to a scratch database: this measures, it does not belong in the user's history.
    os.environ["OPT_DB"] = str(Path(tempfile.mkdtemp()) / "opt.db")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    from openpto.core.generate import encode_prompt

    ids = encode_prompt(loaded.tokenizer, PROMPT, chat=True)
    name = args.model or DEFAULT_ALIAS
    engine = TorchEngine.from_model(loaded.model, loaded.tokenizer, name,
                                    EngineOptions(device=args.device, dtype=args.dtype,
                                                  threads=threads))
    app = create_app(ServerSettings(access_log=False, max_tokens_limit=args.new_tokens),
                     engine, access_sink=None)
    generate_runs: list[dict[str, Any]] = []
    serve_runs: list[dict[str, Any]] = []
    with harness.machine_lock() as load, BackgroundServer(app) as server:
        warm = (run_generate(loaded, args.new_tokens),
                run_serve(server.url, name, ids, args.new_tokens))
        for _ in range(args.repeats):
            generate_runs.append(run_generate(loaded, args.new_tokens))
            serve_runs.append(run_serve(server.url, name, ids, args.new_tokens))
    texts = {r["text"] for r in [*warm, *generate_runs, *serve_runs]}
    results = {"generate": summary(generate_runs), "serve": summary(serve_runs)}
    ratio = (results["serve"]["decode_tokens_per_second"]
             / results["generate"]["decode_tokens_per_second"])
    out = {
        "benchmark": "serve_vs_generate",
        "load_average_at_start": load,
        "model": name, "device": args.device, "dtype": args.dtype, "threads": threads,
        "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "repeats": args.repeats,
        "warmup": 1, "statistic": "median", "synchronized": True,
        "clock": {"generate": "StepRecord timings, first to last token",
                  "serve": "client perf_counter, first to last SSE text chunk"},
        "results": results,
        "serve_over_generate": ratio,
        "identical_text": len(texts) == 1,
        "prompt_tokens_equal": {r["prompt_tokens"] for r in [*generate_runs, *serve_runs]}
        == {len(ids)},
    }
    path = harness.write_json(
        args.out or harness.result_path(f"serve_vs_generate_{args.device}"), out)
    print(f"{name} on {args.device} {args.dtype}, {threads} threads, prompt {len(ids)} tokens, "
          f"{args.new_tokens} new tokens greedy, median of {args.repeats}")
    rows = []
    for key, row in results.items():
        low, high = row["decode_tokens_per_second_spread"]
        rows.append([key, f"{row['decode_tokens_per_second']:.2f}", f"{low:.2f}", f"{high:.2f}",
                     f"{row['ttft_ms']:.1f}", f"{statistics.median(row['tokens']):.0f}"])
    print(harness.markdown_table(["path", "decode tok/s", "min", "max", "TTFT ms", "tokens"],
                                 rows))
    print(f"serve / generate: {ratio:.3f}; identical text: {out['identical_text']}; "
          f"written to {path}")


if __name__ == "__main__":
    main()
