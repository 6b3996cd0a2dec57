"""A 2:4 sparse artifact loaded on CUDA: which Linears go to cuSPARSELt, and do logits hold.

Writes a ``dense`` artifact of a randomly initialised Llama-3-8B-wide model (2 decoder layers,
vocab 512: the Linears are what matter) pruned 2:4 by magnitude, the way ``opt sparsify`` writes
one, then loads it with ``load_model(..., device="cuda", dtype="bfloat16")``. It reports the
verdict per Linear (the loader times each shape dense against sparse and swaps only where
faster), then forces the swap (``tune=False``) to check the semi-structured path's logits
against the dense model's on a 2048-token prompt. No run store needed.

    PYTHONPATH=src:. python benchmarks/gpu_sparse24_artifact.py --json $OUT/sparse24_artifact.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import harness
import torch


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--json", default=str(harness.result_path("gpu_sparse24_artifact")))
    args = parser.parse_args()

    from tests.helpers import tiny_tokenizer
    from transformers import LlamaForCausalLM

    from openpto.api import sparsify_
    from openpto.core.sparsity import nm_compliant
    from openpto.core.sparsity.configs import MagnitudeConfig
    from openpto.kernels.sparse24 import KERNEL_NAME, Sparse24Linear, swap_artifact
    from openpto.models.loader import load_model
    from openpto.pipeline.artifacts import write_artifact

    # Llama-3-8B's widths; two layers and a small vocabulary: the Linears are what matter
    # (transformers' default rope_theta, as in the measured runs)
    config = harness.llama_config(harness.llama3_8b(
        num_hidden_layers=2, vocab_size=512, max_position_embeddings=4096, rope_theta=10000.0))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    result = sparsify_(model, MagnitudeConfig(pattern="2:4"))
    names = sorted(result.masks())
    metadata = {
        "method": "magnitude",
        "config": {"pattern": "2:4"},
        "sparsity": {
            "method": "magnitude",
            "pattern": "2:4",
            "target": 0.5,
            "layers": {name: 0.5 for name in names},
        },
    }
    out = Path(tempfile.mkdtemp()) / "artifact"
    write_artifact(model, tiny_tokenizer(), out, {}, metadata)

    with harness.stopwatch() as load:
        loaded = load_model(str(out), device="cuda", dtype="bfloat16")
    verdicts = loaded.metadata.get("sparse24", {})
    print("tuned load:", loaded.metadata.get("kernels"), dict(Counter(verdicts.values())))

    ids = torch.randint(0, 512, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    ids = ids.cuda()
    dense = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).cuda().eval()
    reference = dense(ids).logits.float()
    forced = swap_artifact(dense, loaded.metadata, tune=False)
    swapped = sum(isinstance(m, Sparse24Linear) for m in dense.modules())
    compliant = all(
        nm_compliant(m.weight, 2, 4) for m in dense.modules() if isinstance(m, Sparse24Linear)
    )
    got = dense(ids).logits.float()
    rel = ((got - reference).norm() / reference.norm()).item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), 0).item()
    report = {
        "tokens": args.tokens,
        "load_seconds": load.wall,
        "tuned_load_kernels": loaded.metadata.get("kernels"),
        "tuned_load_verdicts": verdicts,
        "forced_swap": {
            "swapped": swapped,
            "of": len(forced),
            "kernel": KERNEL_NAME,
            "weights_2_4": compliant,
            "logits_relative_error_vs_dense": rel,
            "logits_cosine": cos,
        },
    }
    print(json.dumps(report["forced_swap"], indent=2))
    harness.write_json(args.json, report)


if __name__ == "__main__":
    main()
