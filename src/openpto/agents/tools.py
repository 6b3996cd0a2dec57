"""The agent's tools: the library's workflows, each a plain function over the public API.

Each ``ToolSpec`` holds a JSON Schema for its arguments (built from the registered configs, see
``openpto.agents.schema``), a synchronous ``run(arguments, env)`` that calls ``openpto`` and
returns plain JSON data, and whether it must be confirmed first (it writes files or runs long).
``sdk_tools`` wraps them as Agents SDK function tools: arguments are checked against the schema,
confirmation is asked, the library call runs in a worker thread, and every error comes back to
the model as text.

There is deliberately no tool that runs a shell, deletes or moves files, or writes to the
database: ``query_database`` opens the database read-only and takes one SELECT/WITH statement.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpto.agents.schema import (
    dataclass_properties,
    field_schema,
    method_schema,
    object_schema,
)
from openpto.errors import StoreError, UsageError

#: most characters of a tool result handed back to the model (small models have small contexts)
MAX_OUTPUT_CHARS = 6000
#: most rows a database query returns to the model
MAX_QUERY_ROWS = 100


@dataclass(frozen=True)
class ToolEnv:
    """What the tools need besides their arguments: the database (None: ``OPT_DB`` or
    ``OPT_HOME/opt.db``)."""

    db_path: Path | None = None

    def store(self) -> Any:
        # A Store per call: sqlite connections belong to the thread that opened them, and each
        # call runs in a worker thread of its own.
        from openpto.store import Store

        return Store(self.db_path)

    def database(self) -> Path:
        from openpto.store import default_db_path

        return self.db_path if self.db_path is not None else default_db_path()


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    run: Callable[[dict[str, Any], ToolEnv], Any]
    #: it writes files or runs for minutes: the user confirms each call unless --yes
    confirm: bool = False


MODEL_ARG = field_schema("str | None", "the model: an alias (smollm2-135m, the default), a "
                         "Hugging Face folder, a .gguf file or an artifact folder")

# Descriptions of workflow-config fields that carry theirs as comments in the source
_EVAL_HELP = {
    "text": "the text to score: a file, folder, .jsonl or corpus name (stdlib-docstrings, the "
            "default)",
    "seq_len": "tokens per window", "max_tokens": "score at most this many tokens",
    "batch_size": "windows per forward pass", "device": "cpu, cuda, cuda:N or mps",
    "dtype": "float32, bfloat16 or float16",
    "text_field": "the field holding the text in JSONL rows",
}
_PROFILE_HELP = {
    "prompt_len": "prompt tokens per row (random ids)",
    "gen_len": "generated tokens per row (at least 2)", "batch": "rows generated together",
    "repeats": "timed runs (medians are reported)", "warmup": "untimed runs first",
    "modules": "add per-module times from torch.profiler", "seed": "seed of the prompt ids",
    "device": "cpu, cuda, cuda:N or mps", "dtype": "float32, bfloat16 or float16",
    "decode": "batch-1 decoder: auto, dynamic, static, graph or compiled",
}


def _workflow_properties(kind: str) -> dict[str, Any]:
    """The options quantize and sparsify share, besides the method and its config."""
    props = {
        "model": MODEL_ARG,
        **method_schema(kind),
        "calib": field_schema("str | None", "calibration text: a file, folder, .jsonl or corpus "
                              "name (pydoc-topics, the default)"),
        "samples": field_schema("int", "calibration windows", 128),
        "calib_seq_len": field_schema("int", "tokens per calibration window", 512),
        "eval": field_schema("str | None", "measure perplexity on this text before and after "
                             "(e.g. stdlib-docstrings); none: no evaluation"),
        "output": field_schema("str | None", "the artifact folder (default: under "
                               "OPT_HOME/artifacts)"),
        "device": field_schema("str", "where layers are calibrated: cpu, cuda, mps", "cpu"),
        "dry_run": field_schema("bool", "plan the artifact (its size) and write nothing", False),
        "float_dtype": field_schema("str", "storage of tensors that are not quantized: "
                                    "bfloat16, float16, float32, keep", "bfloat16"),
    }
    return props


# -- the tools ----------------------------------------------------------------------------------


def _machine_info(args: dict[str, Any], env: ToolEnv) -> Any:
    from openpto.hardware import hardware_info
    from openpto.pipeline.backends import backend_availability

    info = hardware_info()
    info["quantization_backends"] = backend_availability()
    return info


def _artifacts(env: ToolEnv) -> list[dict[str, Any]]:
    keys = ("id", "path", "method", "size_bytes", "created_at")
    if not env.database().exists():
        return []
    return [{k: row.get(k) for k in keys}
            for row in _read_only(env, "SELECT * FROM models ORDER BY created_at")]


def _list_models(args: dict[str, Any], env: ToolEnv) -> Any:
    from openpto.models.aliases import ALIASES, DEFAULT_ALIAS

    return {"default": DEFAULT_ALIAS,
            "aliases": [{"name": a.name, "description": a.description}
                        for a in ALIASES.values()],
            "artifacts": [{"path": a["path"], "method": a["method"]} for a in _artifacts(env)],
            "note": "any Hugging Face folder, .gguf file or cached hub id works as a model too"}


def _list_artifacts(args: dict[str, Any], env: ToolEnv) -> Any:
    return {"artifacts": _artifacts(env)}


def _evaluate(args: dict[str, Any], env: ToolEnv) -> Any:
    import openpto

    model = args.pop("model", None)
    config = openpto.EvalConfig(**args)
    return openpto.evaluate(model, config, store=env.store()).to_dict()


def _method_config(args: dict[str, Any], base: type,
                   what: str) -> tuple[type[Any], dict[str, Any]]:
    from openpto.api import method_config_type

    if "method" not in args:
        raise UsageError(f"name the {what} (the 'method' argument)")
    cls: type[Any] = method_config_type(args.pop("method"), base, what)
    return cls, dict(args.pop("config", None) or {})


def _data_options(args: dict[str, Any]) -> dict[str, Any]:
    import openpto

    calibration = openpto.CalibrationOptions(text=args.pop("calib", None),
                                             samples=args.pop("samples", 128),
                                             seq_len=args.pop("calib_seq_len", 512))
    eval_text = args.pop("eval", None)
    return {"calibration": calibration,
            "evaluation": openpto.EvalOptions(text=eval_text) if eval_text else None}


def _quantize(args: dict[str, Any], env: ToolEnv) -> Any:
    import openpto
    from openpto.config import build
    from openpto.pipeline.backends import get_backend

    cls, values = _method_config(args, openpto.QuantConfig, "quantization method")
    backend = args.pop("backend", "torch")
    if "symmetric" not in values:  # as opt quantize: the backend's default grid for the bits
        bits = values.get("bits", next(f.default for f in _fields(cls) if f.name == "bits"))
        values["symmetric"] = get_backend(backend).default_symmetric(int(bits))
    config = build(cls, values)
    model = args.pop("model", None)
    options = openpto.QuantizeOptions(**_data_options(args), backend=backend, **args)
    return openpto.quantize(model, config, options, store=env.store()).to_dict()


def _fields(cls: type) -> list[Any]:
    import dataclasses

    return list(dataclasses.fields(cls))


def _sparsify(args: dict[str, Any], env: ToolEnv) -> Any:
    import openpto
    from openpto.config import build

    cls, values = _method_config(args, openpto.SparsityConfig, "pruning method")
    config = build(cls, values)
    model = args.pop("model", None)
    options = openpto.SparsifyOptions(**_data_options(args), **args)
    return openpto.sparsify(model, config, options, store=env.store()).to_dict()


def _export(args: dict[str, Any], env: ToolEnv) -> Any:
    import openpto

    artifact = args.pop("artifact")
    config = openpto.ExportConfig(**args)
    return openpto.export(artifact, config, store=env.store()).to_dict()


def _profile(args: dict[str, Any], env: ToolEnv) -> Any:
    import openpto

    model = args.pop("model", None)
    return openpto.profile(model, openpto.ProfileConfig(**args), store=env.store()).to_dict()


def _bench(args: dict[str, Any], env: ToolEnv) -> Any:
    import openpto

    models = list(args.pop("models"))
    return openpto.bench(models, openpto.ProfileConfig(**args), store=env.store()).to_dict()


_READ_ONLY_START = re.compile(r"^\s*(select|with)\b", re.IGNORECASE)


def _strip_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*|/\*.*?\*/", " ", sql, flags=re.DOTALL).strip()


def _read_only(env: ToolEnv, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    """Rows of one SELECT/WITH statement on a read-only connection (``mode=ro``, and
    ``query_only`` besides), so that no statement can write whatever it says."""
    path = env.database()
    if not path.exists():
        raise StoreError(f"no database at {path} yet (nothing has been run)")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA query_only = ON")
        cursor = conn.execute(sql, params or [])
        return [dict(row) for row in cursor.fetchmany(MAX_QUERY_ROWS)]
    except sqlite3.Error as exc:
        if "readonly" in str(exc) or "read-only" in str(exc):
            raise StoreError("the database is read-only here: write statements are refused") \
                from None
        raise StoreError(f"query failed: {exc}") from None
    finally:
        conn.close()


def _query_database(args: dict[str, Any], env: ToolEnv) -> Any:
    sql = str(args.get("sql", ""))
    body = _strip_comments(sql).rstrip(";").strip()
    if not _READ_ONLY_START.match(body):
        raise StoreError("only one SELECT (or WITH ... SELECT) statement is allowed; the "
                         "database is opened read-only")
    if ";" in body:
        raise StoreError("one statement at a time")
    rows = _read_only(env, sql)
    return {"rows": rows, "count": len(rows),
            "limited_to": MAX_QUERY_ROWS if len(rows) == MAX_QUERY_ROWS else None}


def _show_run(args: dict[str, Any], env: ToolEnv) -> Any:
    run_id = args.get("run_id")
    if run_id:
        runs = _read_only(env, "SELECT * FROM runs WHERE id = ?", [run_id])
    else:
        runs = _read_only(env, "SELECT * FROM runs WHERE kind != 'agent' "
                               "ORDER BY started_at DESC LIMIT 1")
    if not runs:
        raise StoreError(f"no run {run_id!r}" if run_id else "no runs yet")
    run = runs[0]
    for key in ("config",):
        if isinstance(run.get(key), str):
            run[key] = json.loads(run[key])
    for key in ("pid", "host", "process_started"):
        run.pop(key, None)
    if run.get("error"):
        run["error"] = run["error"].splitlines()[0]  # the reason; the traceback stays in the db
    metrics = _read_only(env, "SELECT name, value, unit FROM metrics WHERE run_id = ? "
                              "ORDER BY id", [run["id"]])
    traces = _read_only(env, "SELECT name, duration_ms FROM traces WHERE run_id = ? "
                             "ORDER BY id", [run["id"]])
    return {"run": run, "metrics": metrics, "stages": traces}


def build_tools() -> list[ToolSpec]:
    """Every tool, its schema built now from the registered configs (plugins included)."""
    import openpto

    profile_props = dataclass_properties(openpto.ProfileConfig, _PROFILE_HELP)
    none: dict[str, Any] = object_schema({})
    return [
        ToolSpec("machine_info", "This machine: Python, torch, CPU, devices (GPUs) and which "
                 "quantization backends can run here.", none, _machine_info),
        ToolSpec("list_models", "The models that can be named: the built-in aliases and the "
                 "artifacts written so far.", none, _list_models),
        ToolSpec("list_artifacts", "The artifact folders openpto has written (quantized or "
                 "pruned models): path, method, size and date.", none, _list_artifacts),
        ToolSpec("evaluate", "Measure a model's perplexity on a text (lower is better); also "
                 "reports the measured sparsity.",
                 object_schema({"model": MODEL_ARG,
                                **dataclass_properties(openpto.EvalConfig, _EVAL_HELP,
                                                       skip=("trust_remote_code",))}),
                 _evaluate),
        ToolSpec("quantize", "Quantize a model's weights with a registered method and write an "
                 "artifact folder; optionally measure perplexity before and after. Writes "
                 "files and can take minutes.",
                 object_schema({**_workflow_properties("quantization"),
                                "backend": field_schema("str", "quantization backend: torch, "
                                                        "bitsandbytes, quanto, mlx", "torch")},
                               required=("method",)),
                 _quantize, confirm=True),
        ToolSpec("sparsify", "Prune a model's weights with a registered method (unstructured "
                 "sparsity or an N:M pattern such as 2:4) and write an artifact folder. Writes "
                 "files and can take minutes.",
                 object_schema({**_workflow_properties("sparsity"),
                                "batch_size": field_schema("int", "calibration windows per "
                                                           "forward pass", 8),
                                "sparse_format": field_schema("'compressed' | 'dense'",
                                                              "artifact layout", "compressed")},
                               required=("method",)),
                 _sparsify, confirm=True),
        ToolSpec("export", "Export an artifact folder to GGUF (llama.cpp, Ollama), "
                 "compressed-tensors (vLLM) or MLX. Writes files.",
                 object_schema({
                     "artifact": field_schema("str", "the artifact folder to export"),
                     "format": {"type": "string", "enum": _export_formats(),
                                "description": "the output format"},
                     "output": field_schema("str", "the output file (gguf) or folder"),
                     "type": field_schema("str | None", "GGUF tensor type: q8_0, q4_0, q4_1 or "
                                          "f16 (default: the one the artifact maps onto)"),
                 }, required=("artifact", "format", "output")),
                 _export, confirm=True),
        ToolSpec("profile", "Measure a model's generation speed and memory: time to first "
                 "token, time per output token, prefill and decode tokens/s, peak memory.",
                 object_schema({"model": MODEL_ARG, **profile_props}), _profile),
        ToolSpec("bench", "Profile several models under one protocol and compare them. Runs "
                 "each model; can take minutes.",
                 object_schema({"models": {"type": "array", "items": {"type": "string"},
                                           "minItems": 1, "description": "the models to "
                                           "compare"}, **profile_props}, required=("models",)),
                 _bench, confirm=True),
        ToolSpec("query_database", "Run one read-only SQL SELECT on the run database (tables: "
                 "runs, metrics, traces, models, datasets, prompts, agent_sessions, "
                 "agent_messages). Writes are refused.",
                 object_schema({"sql": field_schema("str", "one SELECT or WITH statement")},
                               required=("sql",)),
                 _query_database),
        ToolSpec("show_run", "One recorded run: its kind, status, model, config, error, "
                 "metrics and stages (the latest run when no id is given).",
                 object_schema({"run_id": field_schema("str | None", "the run's id")}),
                 _show_run),
    ]


def _export_formats() -> list[str]:
    from openpto.registry import EXPORTERS

    return sorted(EXPORTERS.names())


def tool_output(data: Any) -> str:
    """A tool's result as the text the model reads: JSON, cut to ``MAX_OUTPUT_CHARS``."""
    text = json.dumps(data, default=str)
    if len(text) > MAX_OUTPUT_CHARS:
        text = text[:MAX_OUTPUT_CHARS] + f"... [cut: {len(text)} characters in all]"
    return text
