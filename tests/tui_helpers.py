"""What the TUI tests share: a tiny model on disk, the registered methods, a Pilot wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: a fixed ``opt info`` answer, so that screens render the same on every machine
MACHINE = {
    "python": "3.11", "torch": "2.x (cpu)",
    "devices": [{"type": "cpu", "name": "test CPU", "memory_bytes": 8 * 2**30}],
    "backends": {"torch-cpu-int4": {"available": True, "reason": ""},
                 "cuda": {"available": False, "reason": "no GPU"}},
}


#: a minimal chat template, so that the served tiny model answers /v1/chat/completions
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def save_tiny_model(folder: Path) -> Path:
    from tests.helpers import tiny_llama, tiny_tokenizer

    model = tiny_llama()
    # Room for the agent's prompt with its tool schemas (rotary positions need no weights).
    model.config.max_position_embeddings = 8192
    model.save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def registered_configs() -> list[dict[str, Any]]:
    import openpto

    return openpto.configs()  # type: ignore[no-any-return]


async def wait_for(pilot: Any, condition: Callable[[], object], timeout: float = 120.0,
                   what: str = "condition") -> None:
    """Let the app run until ``condition()`` holds (a functional wait, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.1)
        await asyncio.sleep(0)


def sync(test: Callable[..., Any]) -> Callable[..., None]:
    """Run an async Pilot test in its own event loop (pytest sees a plain function that takes
    the same fixtures)."""
    import functools

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run
