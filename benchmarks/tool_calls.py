"""Tool calls and JSON replies on the default model: parse/validate rates, and the mask's cost.

Everything runs through the torch engine the server uses (``TorchEngine``: continuous batching,
per-request grammar masks), greedy, with the prompts ``opt serve`` builds
(``engines.tool_calls.chat_prompt``; SmolLM2's template does not render tools, so the Hermes
system block carries them):

1. mask cost: per-token time to compute and unpack a next-token mask over the 49,152-token
   vocabulary, llguidance against xgrammar, on one JSON-schema reply replayed token by token
   (median and p90 over all tokens of 5 replays);
2. forced calls: 50 prompts over 5 tools, ``tool_choice`` alternating ``required`` and a named
   tool; a reply counts when ``parse_reply`` finds exactly one call whose arguments validate;
3. ``json_schema``: 50 replies over 5 schemas, each parsed and validated with jsonschema;
4. ``auto``: 20 prompts, each with the tool a person would expect or none; correct when the
   reply calls that tool first (or calls nothing when none is expected), decoded freely and under
   the text-or-call grammar;
5. decode tokens/s with and without a mask (a JSON schema with one long string), 1 stream and 8
   concurrent streams: completion tokens over wall time of the whole set.

    PYTHONPATH=src python benchmarks/tool_calls.py            # prints the tables, writes JSON
    PYTHONPATH=src python benchmarks/tool_calls.py --quick    # 10/10/6 prompts, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import harness

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_web", "description": "Search the web for a query",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "send_email", "description": "Send an email",
        "parameters": {"type": "object", "properties": {
            "to": {"type": "string"}, "subject": {"type": "string"}},
            "required": ["to", "subject"]}}},
    {"type": "function", "function": {
        "name": "create_event", "description": "Put an event in the calendar",
        "parameters": {"type": "object", "properties": {
            "title": {"type": "string"}, "day": {"type": "integer", "minimum": 1,
                                                 "maximum": 31}},
            "required": ["title", "day"]}}},
    {"type": "function", "function": {
        "name": "list_models", "description": "List the saved models",
        "parameters": {"type": "object", "properties": {}}}},
]
FORCED_PROMPTS = [
    "What's the weather in {x}?", "Find information about {x}.", "Email {x} about the meeting.",
    "Add a dentist appointment for {x} to my calendar.", "Which models have I saved?",
    "Is it cold in {x} right now?", "Look up the history of {x}.", "Tell {x} the report is done.",
    "Schedule lunch with {x} on the 12th.", "Show me my models.",
]
PLACES = ["Paris", "Tokyo", "Lagos", "Lima", "Oslo"]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"city": {"type": "string"},
                                      "population": {"type": "integer", "minimum": 0}},
     "required": ["city", "population"]},
    {"type": "object", "properties": {"title": {"type": "string"},
                                      "tags": {"type": "array", "items": {"type": "string"},
                                               "maxItems": 4}},
     "required": ["title", "tags"]},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                      "confidence": {"type": "number"}},
     "required": ["answer", "confidence"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"product": {"type": "string"},
                                         "qty": {"type": "integer"}},
        "required": ["product", "qty"]}}}, "required": ["items"]},
]
JSON_PROMPTS = ["Describe a person as JSON.", "Give me a city as JSON.",
                "Suggest a blog post as JSON.", "Is the sky blue? Answer as JSON.",
                "Write a shopping list as JSON."]
AUTO_PROMPTS: list[tuple[str, str | None]] = [
    ("What's the weather like in Berlin?", "get_weather"),
    ("Will it rain in London tomorrow?", "get_weather"),
    ("Search the web for the latest Python release.", "search_web"),
    ("Look up who invented the telephone.", "search_web"),
    ("Send an email to bob@example.com saying hello.", "send_email"),
    ("Email my boss that I'm sick today.", "send_email"),
    ("Add a meeting called standup on the 3rd to my calendar.", "create_event"),
    ("Create an event: birthday party on the 20th.", "create_event"),
    ("List my saved models.", "list_models"),
    ("Which models do I have?", "list_models"),
    ("Hello! How are you?", None),
    ("What is 2 + 2?", None),
    ("Write a haiku about the sea.", None),
    ("Translate 'good morning' into French.", None),
    ("What is the capital of Italy?", None),
    ("Tell me a joke.", None),
    ("Explain what a list is in Python.", None),
    ("Thanks, that's all.", None),
    ("What's the temperature in Madrid right now?", "get_weather"),
    ("Find recent news about electric cars.", "search_web"),
]
THROUGHPUT_SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}},
                     "required": ["story"]}


def mask_cost(tokenizer: Any, replays: int = 5) -> dict[str, dict[str, float]]:
    """Per-token mask time (compute + unpack to booleans) of both grammar engines."""
    import numpy as np

    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "age", "tags"], "additionalProperties": False}
    target = json.dumps({"name": "Alice Smith", "age": 42,
                         "tags": ["engineer", "python", "open source", "music"]})
    ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    vocab = len(tokenizer)
    out: dict[str, dict[str, float]] = {}

    def summary(times: list[float], builds: list[float]) -> dict[str, float]:
        times = sorted(times)
        return {"median_us": statistics.median(times) * 1e6,
                "p90_us": harness.percentile(times, 0.9) * 1e6,
                "matcher_ms": statistics.median(builds) * 1e3, "tokens": len(ids)}

    import llguidance
    import llguidance.hf

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    bits = np.full((vocab + 31) // 32, -1, dtype=np.int32)
    times, builds = [], []
    for _ in range(replays):
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(lltok, grammar)
        builds.append(time.perf_counter() - start)
        for token in ids:
            start = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab]
            times.append(time.perf_counter() - start)
            assert allowed[token] and matcher.consume_token(token)
    out["llguidance"] = summary(times, builds)
    try:
        import xgrammar as xgr
    except ImportError:
        return out
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer,
                                                                      vocab_size=vocab))
    mask = xgr.allocate_token_bitmask(1, vocab)
    times, builds = [], []
    for _ in range(replays):
        start = time.perf_counter()
        xmatcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
        builds.append(time.perf_counter() - start)
        for token in ids:
            start = time.perf_counter()
            xmatcher.fill_next_token_bitmask(mask)
            allowed = np.unpackbits(mask.numpy().view(np.uint8), bitorder="little")[:vocab]
            times.append(time.perf_counter() - start)
            assert allowed[token] and xmatcher.accept_token(token)
    out["xgrammar"] = summary(times, builds)
    return out


def _validates(text: str, schema: dict[str, Any], validator: Any) -> bool:
    try:
        return not list(validator(schema).iter_errors(json.loads(text)))
    except json.JSONDecodeError:
        return False


async def run_all(engine: Any, jobs: list[tuple[list[int], Any, str | None]]
                  ) -> tuple[list[str], int, float]:
    """Submit every job at once (the scheduler batches up to max_batch); texts, completion
    tokens and wall seconds."""
    from openpto.engines.streams import RequestStream

    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    streams = []
    for ids, params, grammar in jobs:
        stream = RequestStream(loop, max_pending=params.max_tokens + 2)
        constraint = engine.constraint(grammar) if grammar is not None else None
        engine.submit(ids, params, stream, constraint)
        streams.append(stream)

    async def collect(stream: Any) -> tuple[str, int]:
        parts, tokens = [], 0
        async for record in stream.events():
            if record.finish_reason == "error":
                raise RuntimeError(record.error)
            parts.append(record.text)
            tokens += record.tokens
        return "".join(parts), tokens

    results = await asyncio.gather(*(collect(s) for s in streams))
    return [r[0] for r in results], sum(r[1] for r in results), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=harness.DEFAULT_MODEL)
    parser.add_argument("--quick", action="store_true", help="fewer prompts (a smoke run)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sections", default="mask,forced,json,auto,decode",
                        help="comma-separated: mask, forced, json, auto, decode")
    parser.add_argument("--json", type=Path, default=harness.result_path("tool_calls"))
    args = parser.parse_args()


    from openpto.engines.engine import EngineOptions
    from openpto.engines.tool_calls import chat_prompt, parse_tools
    from openpto.engines.torch_backend import TorchEngine

    engine = TorchEngine(args.model, EngineOptions(max_batch=8, threads=args.threads))
    engine.load()
    tok = engine._tokenizer
    tools = parse_tools(TOOLS)
    payload: dict[str, Any] = {"model": args.model}
    n_forced, n_json, n_auto = (10, 10, 6) if args.quick else (50, 50, 20)

    def ids_of(prompt: str, with_tools: bool) -> list[int]:
        text = chat_prompt(tok, [{"role": "user", "content": prompt}], tools if with_tools else ())
        return engine.tokenize(text)

    sections = set(args.sections.split(","))
    if "mask" in sections:
        payload["mask_cost"] = mask_cost(tok)
        print(harness.markdown_table(
            ["grammar engine", "mask per token, median (us)", "p90 (us)", "new matcher (ms)"],
            [[name, f"{r['median_us']:.1f}", f"{r['p90_us']:.1f}", f"{r['matcher_ms']:.2f}"]
             for name, r in payload["mask_cost"].items()]), flush=True)
    if "forced" in sections:
        forced_calls(engine, tools, ids_of, n_forced, payload, args)
    if "json" in sections:
        json_replies(engine, ids_of, n_json, payload, args)
    if "auto" in sections:
        auto_choice(engine, tools, ids_of, n_auto, payload, args)
    if "decode" in sections:
        decode_speed(engine, ids_of, payload, args)
    engine.close()
    harness.write_json(args.json, payload)
    print_summary(payload)
    print(f"wrote {args.json}")


def forced_calls(engine: Any, tools: Any, ids_of: Any, n_forced: int, payload: dict[str, Any],
                 args: argparse.Namespace) -> None:
    from openpto.core.sampling import SamplingParams
    from openpto.engines.grammar import tool_call_grammar
    from openpto.engines.tool_calls import parse_reply


    # -- forced calls ------------------------------------------------------------------------
    jobs, names = [], []
    for i in range(n_forced):
        prompt = FORCED_PROMPTS[i % len(FORCED_PROMPTS)].format(x=PLACES[(i // 10) % 5])
        choice = "required" if i % 2 == 0 else tools[(i // 2) % len(tools)].name
        names.append(choice)
        jobs.append((ids_of(prompt, True), SamplingParams(max_tokens=64),
                     tool_call_grammar(tools, choice, parallel=False)))
    texts, tokens, wall = asyncio.run(run_all(engine, jobs))
    failed = [text for text, choice in zip(texts, names, strict=True)
              if (p := parse_reply(text, tools)).errors or len(p.tool_calls) != 1
              or choice not in ("required", p.tool_calls[0].name)]
    ok = n_forced - len(failed)
    payload["forced"] = {"requests": n_forced, "parsed_and_valid": ok, "tokens": tokens,
                         "seconds": wall, "examples": texts[:3], "failed": failed}
    harness.write_json(args.json, payload)
    print(f"forced calls: {ok}/{n_forced} parse and validate ({tokens} tokens, {wall:.0f} s)",
          flush=True)


def json_replies(engine: Any, ids_of: Any, n_json: int, payload: dict[str, Any],
                 args: argparse.Namespace) -> None:
    from jsonschema import Draft202012Validator

    from openpto.core.sampling import SamplingParams
    from openpto.engines.grammar import json_grammar

    jobs, schemas = [], []
    for i in range(n_json):
        schema = SCHEMAS[i % len(SCHEMAS)]
        schemas.append(schema)
        prompt = JSON_PROMPTS[i % len(JSON_PROMPTS)] + (f" (variant {i // 5 + 1})" if i >= 5
                                                        else "")
        jobs.append((ids_of(prompt, False), SamplingParams(max_tokens=96), json_grammar(schema)))
    texts, tokens, wall = asyncio.run(run_all(engine, jobs))
    failed = [text for text, schema in zip(texts, schemas, strict=True)
              if not _validates(text, schema, Draft202012Validator)]
    valid = n_json - len(failed)
    payload["json_schema"] = {"requests": n_json, "parsed_and_valid": valid, "tokens": tokens,
                              "seconds": wall, "examples": texts[:3], "failed": failed}
    harness.write_json(args.json, payload)
    print(f"json_schema: {valid}/{n_json} parse and validate ({tokens} tokens, {wall:.0f} s)",
          flush=True)



def auto_choice(engine: Any, tools: Any, ids_of: Any, n_auto: int, payload: dict[str, Any],
                args: argparse.Namespace) -> None:
    from openpto.core.sampling import SamplingParams
    from openpto.engines.grammar import tool_call_grammar
    from openpto.engines.tool_calls import parse_reply

    cases = AUTO_PROMPTS[:n_auto]
    auto: dict[str, Any] = {}
    for mode in ("unconstrained", "constrained"):
        grammar = tool_call_grammar(tools, "auto", parallel=False) if mode == "constrained" \
            else None
        jobs = [(ids_of(prompt, True), SamplingParams(max_tokens=48), grammar)
                for prompt, _ in cases]
        texts, tokens, wall = asyncio.run(run_all(engine, jobs))
        rows = []
        for (prompt, expected), text in zip(cases, texts, strict=True):
            parsed = parse_reply(text, tools)
            chosen = parsed.tool_calls[0].name if parsed.tool_calls else None
            rows.append({"prompt": prompt, "expected": expected, "chosen": chosen,
                         "parse_errors": [e.kind for e in parsed.errors],
                         "correct": chosen == expected and not parsed.errors})
        payload["auto"] = auto
        auto[mode] = {"correct": sum(r["correct"] for r in rows), "prompts": len(rows),
                      "with_parse_errors": sum(bool(r["parse_errors"]) for r in rows),
                      "tokens": tokens, "seconds": wall, "rows": rows}
        print(f"auto {mode}: {auto[mode]['correct']}/{len(rows)} correct, "
              f"{auto[mode]['with_parse_errors']} with parse errors", flush=True)
    payload["auto"] = auto
    harness.write_json(args.json, payload)



def decode_speed(engine: Any, ids_of: Any, payload: dict[str, Any],
                 args: argparse.Namespace) -> None:
    from openpto.core.sampling import SamplingParams
    from openpto.engines.grammar import json_grammar

    speed = []
    prompt_ids = ids_of("Tell me a long story about a dragon, as JSON.", False)
    for streams in (1, 8):
        for masked in (False, True):
            grammar = json_grammar(THROUGHPUT_SCHEMA) if masked else None
            jobs = [(prompt_ids, SamplingParams(max_tokens=32, temperature=0.8, seed=i), grammar)
                    for i in range(streams)]
            asyncio.run(run_all(engine, jobs[:1]))  # warm-up
            _, tokens, wall = asyncio.run(run_all(engine, jobs))
            speed.append({"streams": streams, "mask": masked, "tokens": tokens,
                          "seconds": wall, "tokens_per_second": tokens / wall})
            payload["decode"] = speed
            harness.write_json(args.json, payload)
            print(f"streams {streams} mask {masked}: {tokens / wall:.1f} tok/s", flush=True)


def print_summary(payload: dict[str, Any]) -> None:
    rows = []
    if "forced" in payload:
        rows.append(["forced tool calls parse + validate",
                     f"{payload['forced']['parsed_and_valid']}/{payload['forced']['requests']}"])
    if "json_schema" in payload:
        rows.append(["json_schema replies parse + validate",
                     f"{payload['json_schema']['parsed_and_valid']}/"
                     f"{payload['json_schema']['requests']}"])
    for mode, result in payload.get("auto", {}).items():
        rows.append([f"auto, {mode}: correct choice",
                     f"{result['correct']}/{result['prompts']} ({result['with_parse_errors']}"
                     " with parse errors)"])
    print(harness.markdown_table(["measure", "result"], rows))
    print(harness.markdown_table(
        ["streams", "mask", "decode tokens/s"],
        [[r["streams"], "json schema" if r["mask"] else "none", f"{r['tokens_per_second']:.1f}"]
         for r in payload.get("decode", [])]))


if __name__ == "__main__":
    main()
