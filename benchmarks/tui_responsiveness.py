"""How quickly the terminal UI paints, and whether it stays responsive while a quantize runs.

- ``first paint``: seconds from starting ``python`` to the Home screen drawn (headless, 80x24),
  measured by the parent around a child process; also ``python -X importtime`` of
  ``openpto.tui.app`` (cumulative microseconds) and whether torch was imported (it must not be).
- ``responsiveness``: during a GPTQ run of a random model (child ``opt quantize``, read through
  ``--progress jsonl`` like the Quantize screen does), a 10 ms Textual timer records when it
  fires; the largest gap between two ticks is the longest time the event loop, and so every
  frame, was blocked. Reported: max, p99 and median gap, and the events rendered.

Usage: python benchmarks/tui_responsiveness.py [--layers 8] [--hidden 256] [--samples 32]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

PAINT_CODE = """
import json, sys, time
from openpto.tui.app import make_app
app = make_app(db_path=sys.argv[1], config_file=None)
async def painted(pilot):
    await pilot.pause()
    print(json.dumps({"torch": "torch" in sys.modules, "textual_ready": time.perf_counter()}),
          flush=True)
    app.exit()
app.run(headless=True, size=(80, 24), auto_pilot=painted)
"""

MODEL_CODE = """
import sys
from transformers import LlamaConfig, LlamaForCausalLM
from tests.helpers import tiny_tokenizer
config = LlamaConfig(vocab_size=512, hidden_size={hidden}, intermediate_size={hidden} * 2,
                     num_hidden_layers={layers}, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=1024, tie_word_embeddings=True)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
tiny_tokenizer().save_pretrained(sys.argv[1])
"""


def first_paint(db: Path, repeats: int = 3) -> dict[str, Any]:
    walls = []
    torch_seen = False
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PAINT_CODE, str(db)], capture_output=True,
                             text=True, timeout=120, check=True)
        walls.append(time.perf_counter() - start)
        torch_seen |= json.loads(out.stdout.strip().splitlines()[-1])["torch"]
    imports = subprocess.run([sys.executable, "-X", "importtime", "-c",
                              "import openpto.tui.app"], capture_output=True, text=True,
                             timeout=120, check=True).stderr
    cumulative = {}
    for line in imports.splitlines():
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[1].isdigit():
            cumulative[parts[2]] = int(parts[1])
    top = cumulative.get("openpto.tui.app", 0)
    heavy = sorted(((us, name) for name, us in cumulative.items() if "." not in name),
                   reverse=True)[:6]
    return {"wall_seconds": walls, "best_seconds": min(walls), "torch_imported": torch_seen,
            "import_us_openpto_tui_app": top,
            "largest_top_level_imports_us": [[name, us] for us, name in heavy]}


async def responsiveness(model: Path, db: Path, samples: int) -> dict[str, Any]:
    from textual.widgets import Input, Select

    from openpto.tui.app import make_app

    app = make_app(db_path=db, config_file=db.parent / "config.toml")
    ticks: list[float] = []
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f3")
        screen = app.screen
        select = screen.query_one("#method", Select)
        form = screen.query_one("#form")
        while form.built_for != "gptq":  # the registry is read in a child at start
            await pilot.pause(0.1)
        screen.query_one("#model").value = str(model)
        screen.query_one("#opt-samples", Input).value = str(samples)
        screen.query_one("#opt-calib-seq-len", Input).value = "128"
        screen.query_one("#opt-output", Input).value = str(db.parent / "out")
        assert select.value == "gptq"
        app.set_interval(0.01, lambda: ticks.append(time.perf_counter()))
        idle_end = time.perf_counter() + 3.0  # the same screen with no job, for comparison
        while time.perf_counter() < idle_end:
            await pilot.pause(0.05)
        idle = _gaps(ticks)
        ticks.clear()
        await pilot.press("ctrl+r")
        started = time.perf_counter()
        while screen.last_outcome is None:
            await pilot.pause(0.05)
        seconds = time.perf_counter() - started
        outcome = screen.last_outcome
    return {"job_ok": outcome.ok, "job_error": outcome.error, "job_seconds": seconds,
            "events": outcome.events, **_gaps(ticks), "idle": idle,
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def _gaps(ticks: list[float]) -> dict[str, float]:
    gaps = sorted(b - a for a, b in itertools.pairwise(ticks))
    return {"ticks": len(ticks), "max_gap_ms": 1000 * gaps[-1],
            "p99_gap_ms": 1000 * harness.percentile(gaps, 0.99),
            "median_gap_ms": 1000 * harness.percentile(gaps, 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--out", default=str(harness.result_path("tui_responsiveness")))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="opt-tui-bench-") as tmp:
        folder = Path(tmp) / "model"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(harness.ROOT), *sys.path])}
        subprocess.run([sys.executable, "-c", MODEL_CODE.format(layers=args.layers,
                                                                hidden=args.hidden),
                        str(folder)], check=True, env=env, capture_output=True, timeout=300)
        paint = first_paint(Path(tmp) / "paint.db")
        live = asyncio.run(responsiveness(folder, Path(tmp) / "opt.db", args.samples))
    payload = {"model": {"layers": args.layers, "hidden": args.hidden, "method": "gptq",
                         "samples": args.samples, "seq_len": 128},
               "first_paint": paint, "responsiveness": live}
    path = harness.write_json(args.out, payload)
    print(harness.markdown_table(
        ["measure", "value"],
        [["first paint, best of 3 (s)", f"{paint['best_seconds']:.2f}"],
         ["torch imported by the UI", paint["torch_imported"]],
         ["import openpto.tui.app (ms)", f"{paint['import_us_openpto_tui_app'] / 1000:.0f}"],
         ["quantize job (s)", f"{live['job_seconds']:.1f} ({live['events']} events)"],
         ["largest gap between frames (ms)", f"{live['max_gap_ms']:.1f}"],
         ["p99 / median gap (ms)", f"{live['p99_gap_ms']:.1f} / {live['median_gap_ms']:.1f}"],
         ["idle, no job: largest / median gap (ms)",
          f"{live['idle']['max_gap_ms']:.1f} / {live['idle']['median_gap_ms']:.1f}"],
         ["load average (1 min) after", live["load_average_after"][0]]]))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
