"""A bounded soak of ``opt serve``: concurrent streams for minutes, a share of clients leaving
mid-stream; no failed request, no growth in resident memory or open file descriptors.

Starts ``opt serve`` in a subprocess (a tiny random model by default, or ``--model``) with an API
key, warms it up, reads the server process' RSS and open fds, then runs ``--concurrency``
clients for ``--seconds``. Each client loops over four streaming routes (OpenAI chat and
completions, Ollama generate and chat) and every ``--disconnect-every``-th request closes its
connection after the first few chunks. A request that was not meant to leave early fails on a
non-200 status, a transport error, or a stream that ends without its final chunk
(``finish_reason`` / ``"done": true``). After the run and a settle pause, RSS and fds are read
again, ``/health`` must answer 200 and ``/metrics`` must show no request in flight. Prints a
table and writes JSON (``benchmarks/results/soak.json``).

    .venv/bin/python benchmarks/soak.py --seconds 180 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz
import harness

PROMPTS = ["Tell me about the sea.", "def fibonacci(n):", "The history of Rome", "Hello"]


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    left_early: int = 0
    failures: list[str] = field(default_factory=list)
    tokens: int = 0


def _request(kind: str, model: str, prompt: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    if kind == "openai-chat":
        return "/v1/chat/completions", {"model": model, "stream": True, "max_tokens": max_tokens,
                                        "messages": [{"role": "user", "content": prompt}]}
    if kind == "openai-completions":
        return "/v1/completions", {"model": model, "stream": True, "max_tokens": max_tokens,
                                   "prompt": prompt}
    if kind == "ollama-generate":
        return "/api/generate", {"model": model, "prompt": prompt,
                                 "options": {"num_predict": max_tokens}}
    return "/api/chat", {"model": model, "messages": [{"role": "user", "content": prompt}],
                         "options": {"num_predict": max_tokens}}


def _finished(kind: str, line: str) -> bool:
    if kind.startswith("openai"):
        if not line.startswith("data: ") or line == "data: [DONE]":
            return False
        return any(c.get("finish_reason") for c in json.loads(line[6:]).get("choices", []))
    return bool(line) and json.loads(line).get("done") is True


async def client(index: int, url: str, key: str, model: str, deadline: float, max_tokens: int,
                 disconnect_every: int, tally: Tally, counter: itertools.count[int]) -> None:
    import httpx

    kinds = ["openai-chat", "openai-completions", "ollama-generate", "ollama-chat"]
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        step = index
        while time.monotonic() < deadline:
            kind = kinds[step % len(kinds)]
            path, body = _request(kind, model, PROMPTS[step % len(PROMPTS)], max_tokens)
            step += 1
            leave = next(counter) % disconnect_every == disconnect_every - 1
            tally.sent += 1
            finished = False
            try:
                async with http.stream("POST", path, json=body) as reply:
                    if reply.status_code != 200:
                        tally.failures.append(f"{kind}: status {reply.status_code}")
                        continue
                    chunks = 0
                    async for line in reply.aiter_lines():
                        chunks += 1
                        finished = finished or _finished(kind, line)
                        if leave and chunks >= 3:
                            break  # closing the stream here drops the connection
                if leave and not finished:
                    tally.left_early += 1
                elif finished:
                    tally.completed += 1
                else:
                    tally.failures.append(f"{kind}: the stream ended without its last chunk")
            except httpx.HTTPError as exc:
                tally.failures.append(f"{kind}: {type(exc).__name__}: {exc}")


def process_usage(pid: int) -> dict[str, int]:
    import psutil

    process = psutil.Process(pid)
    return {"rss_bytes": process.memory_info().rss, "open_fds": process.num_fds(),
            "threads": process.num_threads()}


def in_flight(url: str, key: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"},
                     timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(("opt:num_requests_running", "opt:num_requests_waiting"))]
    return sum(values)


async def soak(url: str, key: str, model: str, seconds: float, concurrency: int,
               max_tokens: int, disconnect_every: int) -> Tally:
    tally = Tally()
    counter = itertools.count()
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(client(i, url, key, model, deadline, max_tokens, disconnect_every,
                                  tally, counter) for i in range(concurrency)))
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--disconnect-every", type=int, default=4,
                        help="every N-th request leaves after its first chunks")
    parser.add_argument("--model", default=None, help="default: a tiny random model")
    parser.add_argument("--json", type=Path, default=None, help="default: results/soak.json")
    args = parser.parse_args()
    key = "soak-" + os.urandom(12).hex()
    with tempfile.TemporaryDirectory(prefix="opt-soak-") as tmp:
        workdir = Path(tmp)
        model = Path(args.model) if args.model else fuzz.tiny_model_folder(workdir / "tiny-model")
        server = fuzz.ServeProcess(model, workdir / "opt.db", key, workdir / "serve.log",
                                   max_tokens_limit=max(args.max_tokens, 16))
        try:
            server.wait_ready()
            name = model.name
            # Warm-up: every route once, so that lazily built state is in the "before" reading.
            asyncio.run(soak(server.url, key, name, 5, 4, args.max_tokens, args.disconnect_every))
            time.sleep(2)
            before = process_usage(server.process.pid)
            started = time.perf_counter()
            tally = asyncio.run(soak(server.url, key, name, args.seconds, args.concurrency,
                                     args.max_tokens, args.disconnect_every))
            wall = time.perf_counter() - started
            time.sleep(3)  # let cancelled streams finish their cleanup
            after = process_usage(server.process.pid)
            alive = server.alive()
            active = in_flight(server.url, key)
        finally:
            code = server.stop()
    result = {
        "seconds": round(wall, 1), "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "disconnect_every": args.disconnect_every,
        "model": args.model or "tiny random Llama (2 layers, hidden 64)",
        "requests": tally.sent, "completed": tally.completed, "left_early": tally.left_early,
        "failures": len(tally.failures), "failure_examples": tally.failures[:20],
        "before": before, "after": after,
        "rss_growth_bytes": after["rss_bytes"] - before["rss_bytes"],
        "fd_growth": after["open_fds"] - before["open_fds"],
        "alive_after": alive, "in_flight_after": active, "server_exit_code": code,
    }
    print(harness.markdown_table(
        ["requests", "completed", "left early", "failures", "RSS before MiB", "RSS after MiB",
         "fds before", "fds after", "alive"],
        [[tally.sent, tally.completed, tally.left_early, len(tally.failures),
          f"{before['rss_bytes'] / 2**20:.1f}", f"{after['rss_bytes'] / 2**20:.1f}",
          before["open_fds"], after["open_fds"], alive]]))
    print("wrote", harness.write_json(args.json or harness.result_path("soak"), result))
    if tally.failures or not alive or result["fd_growth"] > 4:
        sys.exit(1)


if __name__ == "__main__":
    main()
