"""Speculative decoding on this CPU: speed-up of each draft kind on the default model.

Greedy, 128 new tokens (end-of-sequence ignored, so every run produces exactly 128), two chat
prompts: one asking to lightly edit a given paragraph (prompt lookup's best case) and one asking
for free text. For each draft kind: tokens/s (generated tokens over wall time, prefill included),
speed-up over plain decoding measured in the same round, acceptance metrics, and whether the
tokens equal plain greedy decoding. For comparison, transformers' ``generate`` on the same model
and prompts: plain, prompt lookup (10 tokens) and assisted generation with the same int4 draft.
Rounds are interleaved (every method once per round) so that load changes on a shared machine hit
all methods alike; medians over rounds are reported.

    python benchmarks/speculative_cpu.py --rounds 3 --out benchmarks/results/speculative_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from openpto.core.generate import encode_prompt, generate_text
from openpto.core.sampling import SamplingParams
from openpto.core.speculative import speculative_generate
from openpto.models import load_model
from openpto.pipeline.generate import resolve_draft

PARAGRAPH = (
    "The lighthouse stood at the edge of the cliff for more than a hundred years. Every night "
    "its keeper climbed the narrow stairs, cleaned the heavy glass and lit the lamp, so that the "
    "fishing boats could find their way home through the fog. In winter the wind was so strong "
    "that the whole tower seemed to shake, but the light never went out. When the old keeper "
    "finally retired, the village held a party in his honour and the children painted his "
    "portrait on the wall of the harbour. Years later, a young woman from the city took over "
    "the lighthouse. She repaired the old clockwork that turned the lens, planted a small garden "
    "behind the tower and kept a diary of every ship that passed. On stormy nights she stayed "
    "awake until dawn, watching the beam sweep across the dark water, and in the morning she "
    "walked down to the harbour to buy bread and hear the news from the fishermen."
)
PROMPTS = {
    "edit": "Repeat the following paragraph, changing only 'lighthouse' to 'beacon' and "
    f"keeping everything else exactly the same:\n\n{PARAGRAPH}",
    "free": "Write a short story about a cat who learns to play the piano.",
}
DRAFTS = ["lookup", "self:int4", "self:int8", "self:layers=10"]


def hf_generate(model: Any, ids: list[int], new: int, **kwargs: Any) -> list[int]:
    config = copy.deepcopy(model.generation_config)
    # Exactly ``new`` tokens, as with ignore_eos in our engine. The prompts are long enough that
    # greedy decoding meets no end-of-sequence before that, so both produce the same tokens.
    config.do_sample = False
    config.max_new_tokens = new
    config.min_new_tokens = new
    inputs = torch.tensor([ids])
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config,
                         **kwargs)
    return [int(t) for t in out[0, len(ids):]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is far steadier on a shared CPU)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--drafts", nargs="+", default=DRAFTS, help="draft kinds to run")
    parser.add_argument("--out", type=Path, default=harness.result_path("speculative_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    target = load_model(None, dtype="float32", device="cpu")
    model, tok = target.model, target.tokenizer
    drafts = {spec: resolve_draft(spec, target)[0] for spec in args.drafts}
    params = SamplingParams(max_tokens=args.new_tokens)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for prompt_name, text in PROMPTS.items():
        ids = encode_prompt(tok, text, chat=True)
        methods: dict[str, Callable[[], Any]] = {
            "plain (ours)": lambda ids=ids: generate_text(model, tok, ids, params, ignore_eos=True),
        }
        for spec, draft in drafts.items():
            methods[spec] = lambda ids=ids, draft=draft: speculative_generate(
                model, tok, draft, ids, params, gamma=args.gamma, ignore_eos=True)
        if not args.no_hf:
            new = args.new_tokens
            methods["transformers plain"] = lambda ids=ids, new=new: hf_generate(model, ids, new)
            methods["transformers prompt lookup"] = lambda ids=ids, new=new: hf_generate(
                model, ids, new, prompt_lookup_num_tokens=10)
            if "self:int4" in drafts:
                int4_model = drafts["self:int4"].model  # type: ignore[attr-defined]
                methods["transformers assisted (int4 draft)"] = (
                    lambda ids=ids, new=new, m=int4_model: hf_generate(
                        model, ids, new, assistant_model=m))
        for _round in range(args.rounds):
            reference: list[int] | None = None
            base_seconds = 0.0
            for name, fn in methods.items():
                value, seconds = harness.timed_call(fn)
                if name == "plain (ours)":
                    reference, base_seconds = value.token_ids, seconds
                tokens = value if isinstance(value, list) else (
                    value.token_ids if hasattr(value, "token_ids") else value.generation.token_ids)
                row = rows.setdefault((prompt_name, name), {"tps": [], "speedup": [],
                                                            "identical": True, "stats": []})
                row["tps"].append(len(tokens) / seconds)
                row["speedup"].append(base_seconds / seconds * len(tokens) / args.new_tokens)
                row["identical"] = row["identical"] and tokens == reference
                if hasattr(value, "stats"):
                    row["stats"].append(value.stats.to_dict())
                print(f"{prompt_name:5s} {name:36s} {len(tokens):4d} tokens "
                      f"{len(tokens) / seconds:7.2f} tok/s "
                      f"x{row['speedup'][-1]:.2f} identical={tokens == reference}", flush=True)
    results = []
    for (prompt_name, name), row in rows.items():
        stats = row["stats"][-1] if row["stats"] else {}
        results.append({
            "prompt": prompt_name, "method": name,
            "tokens_per_second": statistics.median(row["tps"]),
            "speedup": statistics.median(row["speedup"]),
            "identical_to_plain_greedy": row["identical"],
            "draft_acceptance_rate": stats.get("draft_acceptance_rate"),
            "mean_acceptance_length": stats.get("mean_acceptance_length"),
            "acceptance_per_position": stats.get("acceptance_per_position"),
        })
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    print()
    print(harness.markdown_table(
        ["prompt", "method", "tokens/s", "speed-up", "identical", "acceptance rate",
         "mean acceptance length"],
        ([r["prompt"], r["method"], f"{r['tokens_per_second']:.2f}", f"{r['speedup']:.2f}x",
          r["identical_to_plain_greedy"], cell(r["draft_acceptance_rate"]),
          cell(r["mean_acceptance_length"])] for r in results)))
    load_after = os.getloadavg()
    harness.write_json(args.out, {"threads": args.threads, "loadavg_before": load_before,
                                  "loadavg_after": load_after, "rounds": args.rounds,
                                  "new_tokens": args.new_tokens, "gamma": args.gamma,
                                  "results": results})
    print(f"\nwrote {args.out}; load average {load_before} -> {load_after}")


if __name__ == "__main__":
    main()
