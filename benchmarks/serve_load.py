"""Bounded load on `opt serve` over loopback: does continuous batching pay, and does nothing fail?

Starts `python -m openpto serve MODEL` in a subprocess (so the client's Python does not share the
server's GIL), waits for /health, then runs, with streaming OpenAI completions and greedy decoding:

1. `single`: requests one after another (1 stream);
2. `batched`: the same kind of requests with C concurrent streams (default 8);
3. `load`: N requests (default 64) with K in flight (default 16): failures, latency, TTFT.

Aggregate generated tokens/s = completion tokens of all requests / wall time of the phase.
Phases 1 and 2 are measured twice, interleaved (1, 2, 1, 2), and the ratio is taken per round, so
a change in the machine's background load biases both sides alike. Prints a table and writes JSON.

    .venv/bin/python benchmarks/serve_load.py --json benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market in a large city, with many details.",
    "Write a letter to a friend about your summer holidays by the sea.",
    "Tell me everything you know about the history of the bicycle.",
    "Describe how bread is made, from the field to the bakery.",
    "Write a poem about autumn leaves and then explain its images.",
    "Explain to a child why the sky is blue and why sunsets are red.",
]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model: str, port: int, max_batch: int, threads: int | None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "openpto", "serve", model, "--port", str(port),
               "--max-batch", str(max_batch)]
    if threads:
        command += ["--threads", str(threads)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 600) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} while starting")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become healthy")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str,
                      max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    usage: dict[str, int] = {}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "status": response.status_code}
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "status": 200, "error": chunk["error"]}
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get(
                        "content"):
                    first = time.perf_counter()
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as exc:
        return {"ok": False, "status": 0, "error": repr(exc)}
    ended = time.perf_counter()
    return {"ok": True, "tokens": usage.get("completion_tokens", 0),
            "ttft_s": (first or ended) - started, "latency_s": ended - started}


async def phase(url: str, model: str, requests: int, concurrency: int,
                max_tokens: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def guarded(i: int) -> dict[str, Any]:
            async with gate:
                return await one_request(client, url, model, PROMPTS[i % len(PROMPTS)],
                                         max_tokens)

        started = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(requests)))
        wall = time.perf_counter() - started
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = sorted(r["ttft_s"] for r in ok)
    latency = sorted(r["latency_s"] for r in ok)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"requests": requests, "concurrency": concurrency, "failed": len(results) - len(ok),
            "failures": [r for r in results if not r["ok"]][:5],
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "latency_p50_s": pct(latency, 0.5), "latency_p95_s": pct(latency, 0.95),
            "mean_tokens": statistics.mean(r["tokens"] for r in ok) if ok else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-requests", type=int, default=8)
    parser.add_argument("--batched-concurrency", type=int, default=8)
    parser.add_argument("--batched-requests", type=int, default=24)
    parser.add_argument("--load-requests", type=int, default=64)
    parser.add_argument("--load-concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/serve_load.json"))
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(args.model, port, max(args.batched_concurrency,
                                                 args.load_concurrency), args.threads)
    try:
        load_s = wait_healthy(url, process)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        load_before = os.getloadavg()
        asyncio.run(phase(url, model, 2, 2, 8))  # warm-up
        rounds = []
        for _ in range(args.rounds):
            single = asyncio.run(phase(url, model, args.single_requests, 1, args.max_tokens))
            batched = asyncio.run(phase(url, model, args.batched_requests,
                                        args.batched_concurrency, args.max_tokens))
            rounds.append({"single": single, "batched": batched,
                           "speedup": batched["tokens_per_s"] / single["tokens_per_s"]})
        load = asyncio.run(phase(url, model, args.load_requests, args.load_concurrency,
                                 args.max_tokens))
        metrics = httpx.get(url + "/metrics").text
        load_after = os.getloadavg()
    finally:
        process.terminate()
        process.wait(timeout=60)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "command": " ".join(sys.argv),
        "model": model, "backend": "torch", "dtype": "float32", "max_tokens": args.max_tokens,
        "threads": args.threads or "torch default",
        "server_load_s": load_s, "rounds": rounds,
        "speedup_median": statistics.median(r["speedup"] for r in rounds),
        "load": load,
        "server_metrics_excerpt": [line for line in metrics.splitlines()
                                   if line.startswith(("opt:request_success_total",
                                                       "opt:generation_tokens_total"))],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    print(f"model {model}, torch float32, {args.max_tokens} new tokens per request, greedy")
    print(f"{'phase':<28}{'requests':>9}{'failed':>8}{'tokens':>8}{'wall s':>9}{'tok/s':>9}"
          f"{'TTFT p50':>10}{'lat p95':>9}")
    rows = [(f"round {i + 1}: 1 stream", r["single"]) for i, r in enumerate(rounds)]
    rows += [(f"round {i + 1}: {args.batched_concurrency} streams", r["batched"])
             for i, r in enumerate(rounds)]
    rows.append((f"load: {args.load_concurrency} in flight", load))
    for name, p in rows:
        print(f"{name:<28}{p['requests']:>9}{p['failed']:>8}{p['completion_tokens']:>8}"
              f"{p['wall_s']:>9.1f}{p['tokens_per_s']:>9.1f}{p['ttft_p50_s']:>10.2f}"
              f"{p['latency_p95_s']:>9.2f}")
    print(f"speed-up of {args.batched_concurrency} streams over 1 (per round): "
          + ", ".join(f"{r['speedup']:.2f}x" for r in rounds)
          + f"; median {result['speedup_median']:.2f}x")
    print(f"load average before/after: {load_before} / {load_after}; JSON: {args.json}")


if __name__ == "__main__":
    main()
