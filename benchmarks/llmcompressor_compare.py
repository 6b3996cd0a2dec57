"""openpto's GPTQ, AWQ, SparseGPT and Wanda side by side with llm-compressor's, same setting.

Default model (SmolLM2-135M-Instruct, float32), the same calibration token ids for both tools
(``calibration_batches`` of the default text ``pydoc-topics``, 512 tokens, seed 0: 128 windows, or
32 for AWQ), and both outputs scored by openpto's perplexity on the first ``--eval-tokens`` tokens
of ``stdlib-docstrings`` in windows of 512 (the protocol of ``quant_quality.py``).

llm-compressor lives in its own virtual environment (it pins its own transformers); this script
runs in openpto's and drives ``llmcompressor_runner.py`` there. Steps (each saves into the JSON):

    export   write the model folder path and the calibration ids under --work
    llmc     run llm-compressor per setting (timed, under the shared benchmark lock)
    eval     score llm-compressor's saved folders with openpto's perplexity
    ours     run openpto's method on the same ids (timed, under the lock) and score it
    reuse    take openpto's rows measured on the same ids and tokens by quant_quality.py
             (GPTQ asymmetric) and sparsity_quality.py (sparsity_quality_128.json)
    table    print the table

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llmcompressor_compare.py export llmc eval ours \
        --llmc-python /work/llmc-venv/bin/python --work /work/llmc-work
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import harness
import torch

ROOT = harness.ROOT

#: setting -> (openpto config type, its keyword arguments, calibration samples). AWQ uses 32
#: samples: llm-compressor's AWQ took 1155 s wall with 32 on this CPU (docs/benchmarks.md).
SETTINGS: dict[str, tuple[str, dict[str, Any], int]] = {
    "gptq-w4g64-asym": ("gptq", dict(bits=4, group_size=64, symmetric=False), 128),
    "awq-w4g64-asym": ("awq", dict(bits=4, group_size=64, symmetric=False), 32),
    "sparsegpt-50": ("sparsegpt", dict(sparsity=0.5), 128),
    "sparsegpt-2:4": ("sparsegpt", dict(pattern="2:4"), 128),
    "wanda-50": ("wanda", dict(sparsity=0.5), 128),
    "wanda-2:4": ("wanda", dict(pattern="2:4"), 128),
    "gptq-w4g64-sym": ("gptq", dict(bits=4, group_size=64, symmetric=True), 128),
    # openpto only, each compared with gptq-w4g64-asym's llm-compressor row of the same seed:
    # not fitted to the float model's outputs (the default before), fitted with a float stream of
    # 32 samples only, and without float targets in float32, in one pass and in two
    "gptq-w4g64-asym-plain": ("gptq", dict(bits=4, group_size=64, symmetric=False,
                                           float_targets=False), 128),
    "gptq-w4g64-asym-ft32": ("gptq", dict(bits=4, group_size=64, symmetric=False,
                                          float_targets=True, float_target_samples=32), 128),
    "gptq-w4g64-asym-fp32": ("gptq", dict(bits=4, group_size=64, symmetric=False,
                                          calib_dtype="float32", float_targets=False), 128),
    "gptq-w4g64-asym-2pass": ("gptq", dict(bits=4, group_size=64, symmetric=False,
                                           true_sequential=False, calib_dtype="float32",
                                           float_targets=False), 128),
}
#: settings that llm-compressor has no recipe for -> the setting whose llm-compressor row they face
LLMC_BASELINE = {name: "gptq-w4g64-asym" for name in SETTINGS
                 if name.startswith("gptq-w4g64-asym-")}
SEQ_LEN = 512
#: evaluation tokens per family: those of the reference runs (quant_quality.py scores 8,192
#: tokens, sparsity_quality.py's 128-sample runs 4,096), so openpto rows measured there compare
EVAL_TOKENS = {"gptq": 8192, "awq": 8192, "sparsegpt": 4096, "wanda": 4096}


def calib_path(work: Path, samples: int, seed: int = 0) -> Path:
    suffix = f"-seed{seed}" if seed else ""
    return work / f"calib-{samples}x{SEQ_LEN}{suffix}.pt"


def row_key(name: str, seed: int) -> str:
    """Rows of the default calibration (seed 0) keep the setting's name; others add the seed."""
    return f"{name}@seed{seed}" if seed else name


def split_key(key: str) -> tuple[str, int]:
    name, _, seed = key.partition("@seed")
    return name, int(seed or 0)


def export(work: Path, seed: int, result: dict) -> None:
    from openpto.data import CALIBRATION_DEFAULT, calibration_batches, load_text
    from openpto.models import load_model
    from openpto.models.loader import hf_folder

    work.mkdir(parents=True, exist_ok=True)
    tok = load_model(None).tokenizer
    text = load_text(None, default=CALIBRATION_DEFAULT)
    for samples in sorted({s for _, _, s in SETTINGS.values()}):
        ids = calibration_batches(tok, text, samples, SEQ_LEN, seed=seed)
        torch.save(ids, calib_path(work, samples, seed))
        print(f"wrote {calib_path(work, samples, seed)} {tuple(ids.shape)}", flush=True)
    result["model_folder"] = str(hf_folder(None))


def run_llmc(name: str, args: argparse.Namespace, result: dict) -> None:
    samples = SETTINGS[name][2]
    key = row_key(name, args.seed)
    out = args.work / "out" / key.replace(":", "").replace("@", "-")
    cmd = [args.llmc_python, str(ROOT / "benchmarks/llmcompressor_runner.py"), "--recipe", name,
           "--model", result["model_folder"],
           "--calib", str(calib_path(args.work, samples, args.seed)),
           "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    with harness.machine_lock() as load:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with harness.stopwatch() as process:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = process.wall
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"llm-compressor {name} failed ({done.returncode})")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    row.update(folder=str(out), process_wall_s=wall, process_cpu_s=cpu,
               load_average_start_of_process=load)
    result["rows"].setdefault(key, {})["llmcompressor"] = row
    print(f"llm-compressor {key}: oneshot {row['oneshot_wall_s']:.1f} s wall "
          f"{row['oneshot_cpu_s']:.1f} s cpu; logit difference "
          f"{row['max_logit_diff_vs_llmcompressor_forward']:.2e}", flush=True)


def _sparsity(model: torch.nn.Module, kind: str, kwargs: dict) -> dict | None:
    if kind not in ("sparsegpt", "wanda"):
        return None
    from openpto.core.sparsity import summarize

    nm = (2, 4) if kwargs.get("pattern") == "2:4" else None
    summary = summarize(((n, m.weight) for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"), nm)
    return {"sparsity": summary.sparsity, "nm_compliant": summary.nm_compliant}


class Scorer:
    """openpto's perplexity protocol: the evaluation default text, windows of 512."""

    def __init__(self) -> None:
        from openpto.data import EVALUATION_DEFAULT, load_text, tokenize_text
        from openpto.models import load_model

        self.loaded = load_model(None, dtype="float32", device="cpu")
        self.ids = tokenize_text(self.loaded.tokenizer, load_text(None, default=EVALUATION_DEFAULT))

    def __call__(self, model: torch.nn.Module, tokens: int) -> float:
        from openpto.core.metrics import perplexity

        return perplexity(model, self.ids, SEQ_LEN, max_tokens=tokens).perplexity


def eval_llmc(key: str, scorer: Scorer, result: dict) -> None:
    from openpto.models import load_model

    name, _ = split_key(key)
    row = result["rows"][key]["llmcompressor"]
    model = load_model(row["folder"], dtype="float32", device="cpu").model
    kind, kwargs, _ = SETTINGS[name]
    row["eval_tokens"] = EVAL_TOKENS[kind]
    row["perplexity"] = scorer(model, EVAL_TOKENS[kind])
    row["weights"] = _sparsity(model, kind, kwargs)
    print(f"llm-compressor {key}: perplexity {row['perplexity']:.3f} {row['weights'] or ''}",
          flush=True)


def run_ours(name: str, args: argparse.Namespace, scorer: Scorer, result: dict) -> None:
    import openpto.core.quant
    import openpto.core.sparsity  # noqa: F401  (both register their method configs)
    from openpto.api import quantize_, sparsify_
    from openpto.config import registered_config_types

    kind, kwargs, samples = SETTINGS[name]
    config = registered_config_types()[kind](**kwargs)
    calib = torch.load(calib_path(args.work, samples, args.seed))
    model = copy.deepcopy(scorer.loaded.model)
    apply = sparsify_ if kind in ("sparsegpt", "wanda") else quantize_
    with harness.machine_lock() as load, harness.stopwatch() as calibration:
        apply(model, config, calib, device="cpu")
    wall, cpu = calibration.wall, calibration.cpu
    row = {"config": config.to_dict(), "samples": samples, "wall_s": wall, "cpu_s": cpu,
           "load_average_start": load, "eval_tokens": EVAL_TOKENS[kind],
           "perplexity": scorer(model, EVAL_TOKENS[kind]),
           "weights": _sparsity(model, kind, kwargs)}
    key = row_key(name, args.seed)
    result["rows"].setdefault(key, {})["openpto"] = row
    print(f"openpto {key}: {wall:.1f} s wall {cpu:.1f} s cpu, "
          f"perplexity {row['perplexity']:.3f}", flush=True)


#: openpto rows already measured on the same calibration ids and evaluation tokens
SPARSITY_128 = "sparsity_quality_128.json"
REUSE = {
    "gptq-w4g64-asym": ("quant_quality.json", {"setting": "GPTQ int4 g64 asym"}),
    "sparsegpt-50": (SPARSITY_128, {"method": "sparsegpt", "pattern": "unstructured"}),
    "sparsegpt-2:4": (SPARSITY_128, {"method": "sparsegpt", "pattern": "2:4"}),
    "wanda-50": (SPARSITY_128, {"method": "wanda", "pattern": "unstructured"}),
    "wanda-2:4": (SPARSITY_128, {"method": "wanda", "pattern": "2:4"}),
}


def reuse_ours(name: str, result: dict) -> bool:
    """Take openpto's row for ``name`` from its reference benchmark's results, if it has one."""
    if name not in REUSE:
        return False
    file, match = REUSE[name]
    source = json.loads((ROOT / "benchmarks/results" / file).read_text())
    # the reference run must have used the same calibration and evaluation tokens
    calibration = json.dumps(source["calibration"])
    assert "128" in calibration and "512" in calibration and "pydoc-topics" in calibration
    evaluation = json.dumps(source.get("evaluation", source.get("eval")))
    assert str(EVAL_TOKENS[SETTINGS[name][0]]) in evaluation
    row = next(r for r in source["rows"] if all(r.get(k) == v for k, v in match.items()))
    result["rows"].setdefault(name, {})["openpto"] = {
        "reused_from": f"benchmarks/results/{file}", "perplexity": row["perplexity"],
        "wall_s": row["seconds"], "cpu_s": row.get("cpu_seconds"),
        "eval_tokens": EVAL_TOKENS[SETTINGS[name][0]], "samples": 128,
        "note": row.get("process_time", "wall time on a loaded machine"),
    }
    return True


def table(result: dict) -> str:
    nan = float("nan")
    floats = ", ".join(f"{v:.3f} on {k} tokens"
                       for k, v in result.get("float_perplexity", {}).items())
    lines = [f"float32 perplexity: {floats}",
             f"{'setting':17s} {'seed':>4s} {'n':>4s} {'tokens':>6s} | {'openpto ppl':>11s} "
             f"{'wall s':>7s} {'cpu s':>7s} | {'llmc ppl':>9s} {'wall s':>7s} {'cpu s':>7s}"]
    order = {name: i for i, name in enumerate(SETTINGS)}
    keys = sorted(result["rows"], key=lambda k: (order[split_key(k)[0]], split_key(k)[1]))
    for key in keys:
        name, seed = split_key(key)
        kind, _, samples = SETTINGS[name]
        row = result["rows"][key]
        ours, theirs = row.get("openpto", {}), row.get("llmcompressor", {})
        lines.append(
            f"{name:17s} {seed:4d} {samples:4d} {EVAL_TOKENS[kind]:6d} | "
            f"{ours.get('perplexity') or nan:11.3f} {ours.get('wall_s') or nan:7.0f} "
            f"{ours.get('cpu_s') or nan:7.0f} | {theirs.get('perplexity') or nan:9.3f} "
            f"{theirs.get('oneshot_wall_s') or nan:7.0f} {theirs.get('oneshot_cpu_s') or nan:7.0f}")
    lines += seed_summary(result)
    return "\n".join(lines)


def seed_summary(result: dict) -> list[str]:
    """Per setting run on several calibration seeds: each tool's mean and spread, and the mean of
    the per-seed differences (ours minus theirs, in percent of theirs)."""
    by_name: dict[str, list[tuple[float, float]]] = {}
    for key, row in result["rows"].items():
        name, seed = split_key(key)
        ours = row.get("openpto", {}).get("perplexity")
        baseline = result["rows"].get(row_key(LLMC_BASELINE.get(name, name), seed), {})
        theirs = baseline.get("llmcompressor", {}).get("perplexity")
        if ours is not None and theirs is not None:
            by_name.setdefault(name, []).append((ours, theirs))
    lines = []
    for name, pairs in by_name.items():
        if len(pairs) < 2:
            continue
        ours_t, theirs_t = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
        diff = (ours_t / theirs_t - 1) * 100
        lines.append(
            f"{name} over {len(pairs)} calibration seeds: openpto {ours_t.mean():.3f} "
            f"(sd {ours_t.std():.3f}), llm-compressor {theirs_t.mean():.3f} "
            f"(sd {theirs_t.std():.3f}); openpto minus llm-compressor {diff.mean():+.2f}% "
            f"(per seed {', '.join(f'{d:+.2f}' for d in diff.tolist())})")
    return lines


def _fresh_llmc_row(path: Path, name: str, result: dict) -> bool:
    """Take llm-compressor's row from the file (another process may have written it since)."""
    disk = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    row = disk["rows"].get(name, {}).get("llmcompressor")
    if row is not None:
        result["rows"].setdefault(name, {})["llmcompressor"] = row
    return row is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="+",
                        choices=("export", "llmc", "eval", "ours", "reuse", "table"))
    parser.add_argument("--only", nargs="*", choices=tuple(SETTINGS), help="these settings only")
    parser.add_argument("--work", type=Path, default=Path("/work/llmc-work"))
    parser.add_argument("--llmc-python", default="/work/llmc-venv/bin/python")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0,
                        help="calibration windows drawn with this seed (0: the default windows)")
    parser.add_argument("--json", type=Path, default=harness.result_path("llmcompressor_compare"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    result.setdefault("rows", {})
    result.update(
        threads=args.threads, eval=f"stdlib-docstrings, first N tokens (eval_tokens), "
        f"windows of {SEQ_LEN}", calibration=f"pydoc-topics, N x {SEQ_LEN}, seed 0 (rows "
        f"named @seedN: seed N)")
    saved: list[bool] = []
    touched: set[tuple[str, str]] = set()
    run = harness.run_info()
    result.setdefault("commands", []).append(
        {"date": run["date"], "command": run["command"], "commit": run["commit"]})
    names = args.only or list(SETTINGS)

    def save() -> None:
        """Merge this process's rows into the file: the llmc and ours steps may run at once."""
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.work / "results.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            disk = json.loads(args.json.read_text()) if args.json.exists() else {"rows": {}}
            for name, tools in result["rows"].items():
                for tool, row in tools.items():
                    if (name, tool) in touched:
                        disk["rows"].setdefault(name, {})[tool] = row
            disk.update({k: v for k, v in result.items() if k not in ("rows", "commands", "run")})
            if not saved:
                disk.setdefault("commands", []).append(result["commands"][-1])
            disk.pop("run", None)  # write_json puts this process's run first
            harness.write_json(args.json, disk)
            saved.append(True)

    scorer = None
    for step in args.steps:
        if step == "export":
            export(args.work, args.seed, result)
        if step in ("eval", "ours") and scorer is None:
            scorer = Scorer()
            for tokens in sorted(set(EVAL_TOKENS.values())):
                if str(tokens) not in result.setdefault("float_perplexity", {}):
                    result["float_perplexity"][str(tokens)] = scorer(scorer.loaded.model, tokens)
        for name in names if step in ("llmc", "eval", "ours", "reuse") else ():
            key = row_key(name, args.seed)
            if step == "llmc" and name in LLMC_BASELINE:
                print(f"{name}: no llm-compressor recipe (faces {LLMC_BASELINE[name]})")
            elif step == "llmc":
                run_llmc(name, args, result)
                touched.add((key, "llmcompressor"))
            elif step == "eval" and name not in LLMC_BASELINE and _fresh_llmc_row(
                    args.json, key, result):
                eval_llmc(key, scorer, result)  # type: ignore[arg-type]
                touched.add((key, "llmcompressor"))
            elif step == "reuse" and args.seed == 0 and reuse_ours(name, result):
                touched.add((key, "openpto"))
            elif step == "ours":
                run_ours(name, args, scorer, result)  # type: ignore[arg-type]
                touched.add((key, "openpto"))
            save()
        save()
    print(table(result))


if __name__ == "__main__":
    main()
