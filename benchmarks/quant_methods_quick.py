"""Quick perplexity check of the quantization methods on the default model (CPU).

Loads the default model once, quantizes a deep copy with each named setting through
``openpto.api.quantize_`` (128 x 512 calibration tokens of the default calibration text), and
prints the perplexity on the first ``--eval-tokens`` tokens of the default evaluation text with
the quantization wall time. ``benchmarks/quant_quality.py`` is the full benchmark (artifacts,
decode speed); this one only compares the methods' math.

    PYTHONPATH=src .venv/bin/python benchmarks/quant_methods_quick.py --threads 1 \
        --eval-tokens 16384 --settings rtn8,rtn4,rtn4s,gptq4,awq4
"""

from __future__ import annotations

import argparse
import copy
import os

import harness
import torch


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from openpto.api import quantize_
    from openpto.core.metrics import perplexity
    from openpto.core.quant import AWQConfig, GPTQConfig, RTNConfig
    from openpto.data import (
        CALIBRATION_DEFAULT,
        EVALUATION_DEFAULT,
        calibration_batches,
        load_text,
        tokenize_text,
    )
    from openpto.models import load_model

    settings = {
        "rtn8": RTNConfig(),
        "rtn4": RTNConfig(bits=4, group_size=64, symmetric=False),
        "rtn4s": RTNConfig(bits=4, group_size=64, symmetric=True),
        "gptq4": GPTQConfig(bits=4, group_size=64),
        "gptq4s": GPTQConfig(bits=4, group_size=64, symmetric=True),
        "awq4": AWQConfig(bits=4, group_size=64),
        "awq4duo": AWQConfig(bits=4, group_size=64, duo=True),
    }
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--settings", default="rtn8,rtn4,gptq4,awq4", help=",".join(settings))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(None)
    tok = loaded.tokenizer
    eval_ids = tokenize_text(tok, load_text(None, default=EVALUATION_DEFAULT))

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, eval_ids, 512, max_tokens=args.eval_tokens).perplexity

    base = ppl(loaded.model)
    print(f"float32  ppl {base:.3f}", flush=True)
    calib = calibration_batches(
        tok, load_text(None, default=CALIBRATION_DEFAULT), args.samples, 512, seed=0
    )
    for name in args.settings.split(","):
        model = copy.deepcopy(loaded.model)
        with harness.stopwatch() as quantization:
            quantize_(model, settings[name], calib)
        seconds = quantization.wall
        value = ppl(model)
        print(
            f"{name:8s} ppl {value:.3f} ({100 * (value / base - 1):+.2f}%) quantize {seconds:.1f}s",
            flush=True,
        )
        del model


if __name__ == "__main__":
    main()
