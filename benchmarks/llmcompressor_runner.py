"""Run one llm-compressor ``oneshot`` recipe on exported calibration ids; save a dense float folder.

Runs inside a separate virtual environment that has llm-compressor (it pins its own
transformers and compressed-tensors, so it is not installed next to openpto).
``benchmarks/llmcompressor_compare.py`` invokes it; by hand:

    /work/llmc-venv/bin/python benchmarks/llmcompressor_runner.py --recipe gptq-w4g64-asym \
        --model MODEL_FOLDER --calib /work/llmc-work/calib-128x512.pt --out OUT_FOLDER

The output folder holds a plain ``LlamaForCausalLM`` whose weights are the dequantized (or pruned)
values the compressed model computes with, so openpto's loader and perplexity read it like any
float checkpoint. The last stdout line is one JSON object: oneshot wall and CPU seconds, and the
largest logit difference between llm-compressor's own quantized forward and the saved weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
from pathlib import Path

import harness  # stdlib only at import: it runs in llm-compressor's environment too
import torch

RECIPES = ("gptq-w4g64-asym", "gptq-w4g64-sym", "awq-w4g64-asym",
           "sparsegpt-50", "sparsegpt-2:4", "wanda-50", "wanda-2:4")


def _w4g64(symmetric: bool, actorder: str | None) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group",
                               group_size=64, actorder=actorder)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def build_recipe(name: str) -> object:
    """The modifier for ``name``; every default written out so the settings are on record."""
    if name.startswith("gptq"):
        from llmcompressor.modifiers.gptq import GPTQModifier

        # static act-order, damp 0.01, blocks of 128: the same as openpto's GPTQConfig defaults
        return GPTQModifier(config_groups=_w4g64(name.endswith("-sym"), "static"),
                            ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    if name.startswith("awq"):
        from llmcompressor.modifiers.awq import AWQModifier

        return AWQModifier(config_groups=_w4g64(False, None), ignore=["lm_head"], n_grid=20)
    method, _, setting = name.partition("-")
    structure = "2:4" if setting == "2:4" else "0:0"
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=0.5, mask_structure=structure, block_size=128,
                                 dampening_frac=0.01, ignore=["re:.*lm_head"])
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return WandaPruningModifier(sparsity=0.5, mask_structure=structure, ignore=["re:.*lm_head"])


def bypass_pinning() -> None:
    """llm-compressor 0.14's AWQ pins cached activations for GPU copies; CPU-only torch refuses
    ("Cannot access accelerator device when none is available"). Without a GPU there is nothing
    to copy to, so pinning is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def dense_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights the quantized forward computes with (fake-quantized), without quant params."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    state = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None and hasattr(module, "weight_scale"):
            with torch.no_grad():
                state[f"{name}.weight"] = forward_quantize(
                    module, module.weight.data, "weight", scheme.weights).clone()
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=RECIPES, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True, help="a saved LongTensor [n, L]")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    bypass_pinning()
    ids = torch.load(args.calib)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(),
                                 "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    recipe = build_recipe(args.recipe)
    with harness.stopwatch() as elapsed:
        oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
                max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    wall, cpu, load = elapsed.wall, elapsed.cpu, elapsed.load_average
    child = resource.getrusage(resource.RUSAGE_CHILDREN)

    probe = ids[:1]
    with torch.no_grad():
        before = model(probe).logits
    dense = dense_state(model)
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    keep = fresh.state_dict().keys()
    state = {k: v for k, v in model.state_dict().items() if k in keep}
    state.update(dense)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # tied embeddings: lm_head.weight is absent from the state dict and comes from embed_tokens
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    fresh.tie_weights()
    fresh.eval()
    with torch.no_grad():
        after = fresh(probe).logits
    if args.out.exists():
        shutil.rmtree(args.out)
    fresh.save_pretrained(args.out)
    for f in args.model.iterdir():  # tokenizer and chat template, as in the source folder
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy2(f, args.out / f.name)
    import llmcompressor

    print(json.dumps({
        "recipe": args.recipe, "modifier": repr(recipe), "samples": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]), "oneshot_wall_s": wall, "oneshot_cpu_s": cpu,
        "children_cpu_s": child.ru_utime + child.ru_stime, "load_average_start": load,
        "dequantized_linears": len(dense),
        "max_logit_diff_vs_llmcompressor_forward": float((before - after).abs().max()),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "llmcompressor": llmcompressor.__version__,
    }))


if __name__ == "__main__":
    main()
