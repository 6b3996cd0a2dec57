"""The public API: ``import openpto`` stays cheap, every public name resolves, every registered
config round-trips and has a description for every field, and the result dataclasses' dicts
have the CLI's JSON keys."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "typer", "fastapi", "textual", "transformers", "rich")


def test_import_openpto_is_lean() -> None:
    code = ("import sys, openpto; "
            f"print([m for m in {HEAVY!r} if m in sys.modules]); "
            "print(sorted(n for n in dir(openpto) if not n.startswith('_'))[:3])")
    src = Path(__file__).resolve().parents[1] / "src"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(src), "PATH": ""}).stdout
    loaded, names = out.splitlines()
    assert loaded == "[]"
    assert names.startswith("[")


def test_every_public_name_resolves() -> None:
    import openpto

    for name in openpto.__all__:
        assert getattr(openpto, name) is not None, name
    assert {"load_model", "evaluate", "quantize", "sparsify", "export", "generate", "profile",
            "configs", "GPTQConfig", "SparseGPTConfig", "GenerationConfig",
            "ProfileConfig"} <= set(dir(openpto))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        openpto.nothing  # noqa: B018


def _registered() -> dict[str, type]:
    from openpto.api import load_methods
    from openpto.config import registered_config_types

    load_methods()
    return registered_config_types()


def _varied(cls: type) -> object:
    """An instance of ``cls`` whose fields differ from the defaults where a valid other value
    exists (a bool flipped, a number moved), so a round trip that drops a field shows."""
    from openpto.config import describe_config
    from openpto.errors import ConfigError

    base = cls()
    for info in describe_config(cls):
        value = info.default
        candidates: list[object] = []
        if isinstance(value, bool):
            candidates = [not value]
        elif isinstance(value, int):
            candidates = [value * 2, value + 1, value - 1]
        elif isinstance(value, float):
            candidates = [value * 2, value / 2]
        for candidate in candidates:
            try:
                base = dataclasses.replace(base, **{info.name: candidate})  # type: ignore[type-var]
                break
            except ConfigError:  # a value this config refuses: try the next
                continue
    return base


def test_every_registered_config_round_trips_and_describes_its_fields() -> None:
    from openpto.cli.method_config import resolve_config
    from openpto.config import config_from_dict, describe_config

    registered = _registered()
    assert {"rtn", "gptq", "awq", "nf4", "int8", "magnitude", "wanda", "sparsegpt"} <= set(
        registered)
    for name, cls in registered.items():
        for cfg in (cls(), _varied(cls)):
            data = cfg.to_dict()  # type: ignore[attr-defined]
            assert data["type"] == name and data["version"] == cls.version  # type: ignore[attr-defined]
            assert config_from_dict(json.loads(json.dumps(data))) == cfg
            # Every field is reachable from --set: its value, written as text, parses back.
            text = {f.name: "none" if f.default is None else str(f.default).lower()
                    if isinstance(f.default, bool) else str(f.default)
                    for f in describe_config(cfg)}
            assert resolve_config(cls, {}, None, [f"{k}={v}" for k, v in text.items()]) == cfg
        for info in describe_config(cls):
            assert info.help, f"{name}.{info.name} has no description"
    changed = _varied(registered["gptq"])
    assert changed != registered["gptq"]()


def test_configs_lists_fields_types_defaults_and_descriptions() -> None:
    import openpto

    listed = {c["name"]: c for c in openpto.configs()}
    assert set(listed) == set(_registered())
    gptq = listed["gptq"]
    assert gptq["kind"] == "quantization" and gptq["has_transform"] is True
    assert gptq["description"].startswith("GPTQ")
    damp = {f["name"]: f for f in gptq["fields"]}["damp"]
    assert damp == {"name": "damp", "type": "float", "default": 0.01,
                    "help": "fraction of the mean Hessian diagonal added before Cholesky"}
    assert listed["wanda"]["kind"] == "sparsity"
    assert listed["nf4"]["has_transform"] is False  # bitsandbytes' own format
    json.dumps(listed)


def test_result_dicts_have_the_cli_json_keys() -> None:
    from openpto.pipeline.evaluate import EvalResult
    from openpto.pipeline.export import ExportResult
    from openpto.pipeline.quantize import QuantizeResult
    from openpto.pipeline.sparsify import SparsifyResult

    def keys(cls: type, **values: object) -> set[str]:
        fields = {f.name: 0 for f in dataclasses.fields(cls)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        return set(cls(**{**fields, **values}).to_dict())

    quantize = {"output", "method", "bits", "group_size", "symmetric", "backend", "format",
                "size_bytes_before", "size_bytes_after", "seconds", "run_id"}
    assert keys(QuantizeResult) == quantize
    assert keys(QuantizeResult, perplexity_before=1.0, perplexity_after=2.0) == quantize | {
        "perplexity_before", "perplexity_after"}
    assert keys(QuantizeResult, dry_run=True) == quantize | {"dry_run"}
    sparsify = {"output", "method", "pattern", "sparsity", "target_sparsity", "nm_compliant",
                "params_pruned", "dense_bytes", "sparse_bytes", "sparse_layout",
                "speedup_bounds", "seconds", "size_bytes_after", "run_id"}
    assert keys(SparsifyResult) == sparsify
    assert keys(EvalResult) == {"perplexity", "tokens", "scored_tokens", "windows",
                                "dropped_tokens", "seq_len", "seconds", "text", "sparsity",
                                "nm_compliant", "linear_params", "nonzero_linear_params",
                                "run_id"}
    assert keys(ExportResult, details={"type": "q4_1"}) == {"output", "format", "size_bytes",
                                                            "type", "run_id"}
