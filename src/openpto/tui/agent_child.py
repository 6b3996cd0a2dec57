"""The agent's own process: ``python -m openpto.tui.agent_child`` runs one prompt through
``openpto.agents.runner.run_agent`` and speaks JSON lines with the Agent screen, so that the
model and the tools (which import torch) never load into the UI process.

stdin, first line: ``{"prompt": ..., "settings": {AgentSettings fields}}``; later lines answer
confirmations: ``{"answer": true|false}``.
stdout, one object per line: ``{"type": "TextDelta"|"ToolCalled"|"ToolFinished", ...fields}``,
``{"type": "confirm", "name", "arguments"}``, then ``{"type": "result", ...}`` or
``{"type": "error", "error"}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from openpto.errors import OptError
from openpto.progress import error_reason, json_safe


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(json_safe(obj)) + "\n")
    sys.stdout.flush()


async def _main() -> int:
    request = json.loads(sys.stdin.readline())
    runner = importlib.import_module("openpto.agents.runner")
    fields = {f.name for f in dataclasses.fields(runner.AgentSettings)}
    values = {k: v for k, v in request.get("settings", {}).items() if k in fields}
    if values.get("db_path"):
        values["db_path"] = Path(values["db_path"])
    if values.get("tools") is not None:
        values["tools"] = tuple(values["tools"])
    settings = runner.AgentSettings(**values)

    def on_event(event: Any) -> None:
        _send({"type": type(event).__name__, **dataclasses.asdict(event)})

    async def confirm(name: str, arguments: dict[str, Any]) -> bool:
        _send({"type": "confirm", "name": name, "arguments": arguments})
        line = await asyncio.to_thread(sys.stdin.readline)
        return bool(json.loads(line or "{}").get("answer"))

    result = await runner.run_agent(request["prompt"], settings, confirm=confirm,
                                    on_event=on_event)
    _send({"type": "result", **result.to_dict()})
    return 0


def main() -> int:
    try:
        return asyncio.run(_main())
    except (OptError, ImportError, NotImplementedError, OSError, ValueError) as exc:
        _send({"type": "error", "error": error_reason(exc) if not isinstance(exc, OptError)
               else str(exc)})
        return 1
    except KeyboardInterrupt:
        _send({"type": "error", "error": "interrupted"})
        return 130


if __name__ == "__main__":
    sys.exit(main())
