"""How long the default model takes to load: the one-time GGUF conversion, then cached loads.

Each load runs in a fresh Python process with a fresh ``OPT_HOME`` (so the first load converts),
and reports three times: importing torch, ``load_model()`` itself (which imports transformers on
its first call), and the whole process. Cached loads are repeated and the median is reported.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/model_load.py --repeats 3 \
        --json benchmarks/results/model_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

CHILD = """
import json
import harness  # stdlib only: it costs nothing measured here
with harness.stopwatch() as imported:
    import torch
with harness.stopwatch() as loading:
    from openpto.models import load_model
    loaded = load_model()
print(json.dumps({"import_torch_s": imported.wall, "load_model_s": loading.wall,
                  "parameters": loaded.num_parameters, "weight_bytes": loaded.weight_bytes}))
"""


def _one_load(home: Path) -> dict[str, float]:
    env = {**os.environ, "OPT_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(harness.ROOT / "src"),
                                          str(harness.ROOT / "benchmarks")])}
    with harness.stopwatch() as process:
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                             text=True, check=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "process_s": process.wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cached loads to take the median of")
    parser.add_argument("--json", type=Path, help="also save the results here")
    args = parser.parse_args()

    # The machine may be shared: record how busy it was around the measurement.
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="openpto-load-bench-") as tmp:
        home = Path(tmp)
        first = _one_load(home)
        cached = [_one_load(home) for _ in range(args.repeats)]
        cache_bytes = sum(p.stat().st_size for p in (home / "cache" / "models").rglob("*")
                          if p.is_file())

    rows = [("first load (converts the GGUF)", first)]
    median = {k: statistics.median(r[k] for r in cached) for k in ("import_torch_s",
                                                                  "load_model_s", "process_s")}
    rows.append((f"cached load (median of {args.repeats})", median))
    print(f"{'':34} {'import torch':>13} {'load_model()':>13} {'process':>9}")
    for label, r in rows:
        print(f"{label:34} {r['import_torch_s']:12.2f}s {r['load_model_s']:12.2f}s "
              f"{r['process_s']:8.2f}s")
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"cache folder: {cache_bytes / 1e6:.0f} MB; parameters {first['parameters']:,}; "
          f"1-minute load average {load_before} before, {load_after} after")

    if args.json:
        harness.write_json(args.json, {
            "first": first,
            "cached": cached,
            "cached_median": median,
            "cache_bytes": cache_bytes,
            "load_average_1min": [load_before, load_after],
        })


if __name__ == "__main__":
    main()
