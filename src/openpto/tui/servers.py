"""Child servers (``opt serve``, Datasette): a free port, and waiting until one answers."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_http(url: str, process: asyncio.subprocess.Process,
                        timeout: float = 120.0, ready_below: int = 500) -> bool:
    """Poll ``url`` until it answers with a status below ``ready_below`` (``/health`` of
    ``opt serve`` says 503 while the model loads); False when the process exits or the time
    runs out."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                return False
            try:
                if (await client.get(url)).status_code < ready_below:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.3)
    return False


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``name -> value``, summing a metric's labelled series."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out
