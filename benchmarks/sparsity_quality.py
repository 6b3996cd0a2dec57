"""Pruning quality on the default model: magnitude vs Wanda vs SparseGPT, 50% and 2:4.

Default model (SmolLM2-135M-Instruct, float32, CPU); calibration 128 x 512 tokens of the
calibration default text (``pydoc-topics``, seed 0); perplexity on the evaluation default text
(``stdlib-docstrings``, which shares no text with the calibration one), windows of 512, the first
``--eval-tokens`` tokens. Every decoder Linear is pruned; embeddings and the head are not. The
sparsity column is measured from the weights over the pruned Linears; ``seconds`` is the wall time
of calibration and pruning, ``cpu_seconds`` the process CPU time over the same span.

Usage: python benchmarks/sparsity_quality.py [--eval-tokens 16384] [--out sparsity_quality.json]
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

import harness
import torch

from openpto.api import sparsify_
from openpto.core.metrics import perplexity
from openpto.core.sparsity import (
    MagnitudeConfig,
    SparseGPTConfig,
    SparsityConfig,
    WandaConfig,
    summarize,
)
from openpto.data import (
    CALIBRATION_DEFAULT,
    EVALUATION_DEFAULT,
    calibration_batches,
    load_text,
    tokenize_text,
)
from openpto.models import load_model

SETTINGS: list[SparsityConfig] = [  # the slow, calibrated methods first
    SparseGPTConfig(sparsity=0.5),
    WandaConfig(sparsity=0.5),
    MagnitudeConfig(sparsity=0.5),
    SparseGPTConfig(pattern="2:4"),
    WandaConfig(pattern="2:4"),
    MagnitudeConfig(pattern="2:4"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run only these type names (e.g. wanda)")
    parser.add_argument("--pattern", choices=("unstructured", "2:4"),
                        help="run only the 50%% unstructured or only the 2:4 settings")
    parser.add_argument("--out", type=Path, default=harness.result_path("sparsity_quality"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(None, dtype="float32", device="cpu")
    eval_ids = tokenize_text(loaded.tokenizer, load_text(None, default=EVALUATION_DEFAULT))
    calib = calibration_batches(loaded.tokenizer, None, args.samples, args.calib_seq_len, seed=0)
    result: dict[str, Any] = {
        "threads": args.threads,
        "load_average_start": os.getloadavg(),
        "model": loaded.name, "calibration": f"{CALIBRATION_DEFAULT}, {args.samples}x"
        f"{args.calib_seq_len}, seed 0", "eval": f"{EVALUATION_DEFAULT}, first "
        f"{args.eval_tokens} tokens, windows of {args.seq_len}", "rows": [],
    }

    def score(model: torch.nn.Module) -> float:
        return perplexity(model, eval_ids, args.seq_len, max_tokens=args.eval_tokens).perplexity

    with harness.stopwatch() as evaluation:
        result["float_perplexity"] = score(loaded.model)
    result["float_seconds_eval"] = evaluation.wall
    print(f"float perplexity {result['float_perplexity']:.3f}", flush=True)
    print(f"{'method':10s} {'pattern':13s} {'sparsity':>9s} {'ppl':>9s} {'x float':>8s} {'s':>7s}")
    for config in SETTINGS:
        if args.only and config.type_name not in args.only:
            continue
        if args.pattern and config.label != args.pattern:
            continue
        model = copy.deepcopy(loaded.model)
        with harness.stopwatch() as pruning:
            pruned = sparsify_(model, config, calib)
        cpu_seconds = pruning.cpu
        params = dict(model.named_parameters())
        summary = summarize(((r.name, params[f"{r.name}.weight"]) for r in pruned.reports),
                            config.nm)
        ppl = score(model)
        row = {"method": config.type_name, "pattern": config.label,
               "sparsity": summary.sparsity, "nm_compliant": summary.nm_compliant,
               "perplexity": ppl, "ratio_to_float": ppl / result["float_perplexity"],
               "seconds": pruned.seconds, "cpu_seconds": cpu_seconds,
               "config": config.to_dict()}
        result["rows"].append(row)
        harness.write_json(args.out, result)
        print(f"{row['method']:10s} {row['pattern']:13s} {row['sparsity']:9.4f} {ppl:9.3f} "
              f"{row['ratio_to_float']:8.3f} {row['seconds']:7.1f}", flush=True)
        del model, pruned
    harness.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
