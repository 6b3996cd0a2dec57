"""GPTQ calibration time of the default model on the CPU, per phase, with the perplexity it buys.

Runs the path of ``opt quantize smollm2-135m --method gptq --bits 4 --group-size 64``
(``openpto.quantize`` with a ``GPTQConfig``: 128 calibration windows of 512 tokens of the
default calibration text, the torch backend, an artifact folder written) with perplexity before
and after on the first ``--eval-tokens`` tokens of the default evaluation text (windows of 512, the
protocol of ``benchmarks/quant_quality.py``). Prints a table and saves JSON: wall and CPU seconds
of calibration + quantization and of the artifact write, the per-phase totals that the run wrote
to its per-layer traces (forward passes, Hessian products, GPTQ solves, packing of the codes), the
load average at the start, threads, and the perplexities.

The default fits each Linear to the float model's outputs: a second, float stream of hidden
states, timed as the ``float`` phase. ``--variants`` also runs without it (``no-float-targets``),
and the earlier calibrations: the one-pass driver in float32 (``one-pass-fp32``) and one float32
pass to collect the Hessians and one to propagate, per layer (``two-pass-fp32``); they differ
from the default only in the GPTQ config passed to ``openpto.quantize`` (``float_targets``,
``true_sequential``, ``calib_dtype``). Time it alone on the machine:

    flock -x /tmp/openpto-bench.lock env HF_HUB_OFFLINE=1 .venv/bin/python \
        benchmarks/gptq_cpu_time.py --variants default two-pass-fp32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import harness

#: GPTQConfig fields per variant (the default variant changes nothing)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-float-targets": {"float_targets": False},
    "one-pass-fp32": {"calib_dtype": "float32", "float_targets": False},
    "two-pass-fp32": {"true_sequential": False, "calib_dtype": "float32", "float_targets": False},
}
PHASES = ("forward", "float", "hessian", "solve", "pack")
#: llm-compressor 0.14 GPTQ w4 g64 asymmetric (``oneshot``) on the same model and calibration ids,
#: 2 threads, under the lock (docs/benchmarks.md, Calibration time)
LLM_COMPRESSOR_SECONDS = 490.2


def run_variant(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import openpto
    from openpto.store import Store

    config = openpto.GPTQConfig(bits=4, group_size=64, **VARIANTS[name])
    options = openpto.QuantizeOptions(
        calibration=openpto.CalibrationOptions(samples=args.samples, seq_len=args.calib_seq_len),
        evaluation=openpto.EvalOptions(text="stdlib-docstrings", max_tokens=args.eval_tokens),
        output=workdir / name,
    )
    store = Store(workdir / f"{name}.db")
    load_start = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    result = openpto.quantize("smollm2-135m", config, options, store=store).to_dict()
    total_wall, total_cpu = time.perf_counter() - wall, time.process_time() - cpu
    # The torch backend's own timing, in the run's "quantize" trace: calibration + quantization
    # (``seconds``, ``cpu_seconds``), then storing the codes and writing the folder (``write_*``).
    (row,) = store.query_readonly(
        "select duration_ms, attributes from traces where run_id = ? and name = 'quantize'",
        [result["run_id"]])
    stage = json.loads(row["attributes"]) if isinstance(row["attributes"], str) \
        else row["attributes"]
    timing = {
        "calibration_wall": stage["seconds"], "calibration_cpu": stage["cpu_seconds"],
        "backend_wall": row["duration_ms"] / 1000.0,
        "backend_cpu": stage["cpu_seconds"] + stage["write_cpu_seconds"],
    }
    layers = [
        json.loads(row["attributes"]) if isinstance(row["attributes"], str) else row["attributes"]
        for row in store.query_readonly(
            "select attributes from traces where run_id = ? and name like 'layer %' "
            "order by started_at", [result["run_id"]])
    ]
    phases = {p: sum(layer["phases"].get(p, 0.0) for layer in layers) for p in PHASES}
    # Per Linear: which Hessians needed float32 products, dampening above the configured one,
    # and refits that could not be made.
    solves = [linear for layer in layers for linear in layer.get("linears", {}).values()]
    products: dict[str, int] = {}
    for linear in solves:
        kind = str(linear.get("hessian_products"))
        products[kind] = products.get(kind, 0) + 1
    damped = sum(1 for linear in solves if linear.get("damp", 0.01) > 0.01)
    unrefitted = sum(1 for linear in solves if "refit" in linear and linear["refit"] is None)
    phases_cpu = {p: sum(layer["phases_cpu"].get(p, 0.0) for layer in layers) for p in PHASES}
    return {
        "variant": name,
        "gptq_config": VARIANTS[name],
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "calibration_wall_seconds": timing["calibration_wall"],
        "calibration_cpu_seconds": timing["calibration_cpu"],
        "artifact_write_wall_seconds": timing["backend_wall"] - timing["calibration_wall"],
        "artifact_write_cpu_seconds": timing["backend_cpu"] - timing["calibration_cpu"],
        "backend_wall_seconds": timing["backend_wall"],
        "backend_cpu_seconds": timing["backend_cpu"],
        "run_wall_seconds": total_wall,
        "run_cpu_seconds": total_cpu,
        "phases_wall_seconds": phases,
        "phases_cpu_seconds": phases_cpu,
        "perplexity_before": result["perplexity_before"],
        "perplexity_after": result["perplexity_after"],
        "delta_percent": 100 * (result["perplexity_after"] / result["perplexity_before"] - 1),
        "hessian_products_per_linear": products,
        "linears_damped_above_config": damped,
        "linears_not_refitted": unrefitted,
        "layers": layers,
    }


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--json", default=str(harness.result_path("gptq_cpu_time")))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="gptq-cpu-time-") as tmp:
        for name in args.variants:
            row = run_variant(name, args, Path(tmp))
            rows.append(row)
            print(f"{name}: calibration {row['calibration_wall_seconds']:.1f} s wall, "
                  f"{row['calibration_cpu_seconds']:.1f} CPU-s; perplexity "
                  f"{row['perplexity_before']:.3f} -> {row['perplexity_after']:.3f}", flush=True)
            print(f"  Hessian products per Linear {row['hessian_products_per_linear']}, "
                  f"{row['linears_damped_above_config']} dampened above the config, "
                  f"{row['linears_not_refitted']} not refitted", flush=True)
            save(args, rows)
    print_table(rows)
    print(f"saved {args.json}")


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("variant", "load", "wall s", "CPU s", *(f"{p} s (CPU)" for p in PHASES),
            "write s", "ppl before", "ppl after", "vs float")
    print(harness.markdown_table(head, ([
        r["variant"], f"{r['load_average_start'][0]:.1f}",
        f"{r['calibration_wall_seconds']:.1f}", f"{r['calibration_cpu_seconds']:.1f}",
        *(f"{r['phases_wall_seconds'][p]:.1f} ({r['phases_cpu_seconds'][p]:.1f})"
          for p in PHASES),
        f"{r['artifact_write_wall_seconds']:.1f}",
        f"{r['perplexity_before']:.3f}", f"{r['perplexity_after']:.3f}",
        f"{r['delta_percent']:+.2f} %",
    ] for r in rows)))
    print(f"llm-compressor 0.14 GPTQ w4 g64, same model and calibration ids: "
          f"{LLM_COMPRESSOR_SECONDS:.1f} s wall")


def save(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    from openpto.data import CALIBRATION_DEFAULT, EVALUATION_DEFAULT

    result = {
        "calibration": {"text": CALIBRATION_DEFAULT, "samples": args.samples,
                        "seq_len": args.calib_seq_len, "seed": 0},
        "evaluation": {"text": EVALUATION_DEFAULT, "seq_len": 512, "tokens": args.eval_tokens},
        "llm_compressor_seconds": LLM_COMPRESSOR_SECONDS,
        "rows": rows,
    }
    harness.write_json(args.json, result)


if __name__ == "__main__":
    main()
