"""Artifacts only their own library reads (bitsandbytes, quanto): ``load_model``, ``opt eval`` and
``opt generate`` run them where the package is installed, and fail with one line naming the
package where it is not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from openpto.store import Store
from tests.helpers import run_opt

PROMPT = "def parse(text):"


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Widths 64 and 128: whole NF4 blocks, as bitsandbytes' CPU matmul needs."""
    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    return save_model(tiny_llama(seed=3), tiny_tokenizer(), tmp_path_factory.mktemp("tiny64"))


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openpto.data import load_text

    path = tmp_path_factory.mktemp("text") / "held-out.txt"
    path.write_text(load_text("stdlib-docstrings").text[:1200], encoding="utf-8")
    return path


def _quantize(tiny64: Path, eval_file: Path | None, out: Path, *, method: str, bits: int,
              backend: str) -> dict:
    import openpto
    from openpto.api import method_config_type

    config = method_config_type(method, openpto.QuantConfig)(bits=bits, group_size="auto",
                                                             symmetric=bits >= 8 or method == "nf4")
    evaluation = None if eval_file is None else openpto.EvalOptions(text=str(eval_file),
                                                                     seq_len=64)
    options = openpto.QuantizeOptions(output=out, evaluation=evaluation, backend=backend)
    return openpto.quantize(str(tiny64), config, options,
                            store=Store(out.parent / "quantize.db")).to_dict()


def _greedy_text(model: torch.nn.Module, tokenizer: object, n: int) -> str:
    """transformers' own greedy decoding of the same weights: the reference for ``opt generate``."""
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids  # type: ignore[operator]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False,  # type: ignore[operator]
                             min_new_tokens=n, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1]:])  # type: ignore[attr-defined,no-any-return]


def _eval_and_generate(artifact: Path, eval_file: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    code, out, err = run_opt(["eval", str(artifact), "--text", str(eval_file), "--seq-len", "64",
                              "--json"], capsys, monkeypatch)
    assert code == 0, err
    evaluated = json.loads(out)
    code, out, err = run_opt(["generate", str(artifact), "--prompt", PROMPT, "--raw",
                              "--max-new-tokens", "8", "--no-stream", "--json"],
                             capsys, monkeypatch)
    assert code == 0, err
    return evaluated, json.loads(out)


@pytest.mark.parametrize(("backend", "method", "bits", "module"), [
    ("bitsandbytes", "nf4", 4, "Linear4bit"),
    ("quanto", "rtn", 4, "QLinear"),  # qint4 cannot run under inference_mode by itself
])
def test_library_artifact_runs_through_eval_and_generate(
        backend: str, method: str, bits: int, module: str, tiny64: Path, eval_file: Path,
        tmp_path: Path, tmp_db: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip({"bitsandbytes": "bitsandbytes", "quanto": "optimum.quanto"}[backend])
    from openpto.models import load_model

    out = tmp_path / backend
    quantized = _quantize(tiny64, eval_file, out, method=method, bits=bits, backend=backend)
    loaded = load_model(str(out))
    assert type(loaded.model.model.layers[0].mlp.down_proj).__name__ == module
    assert loaded.metadata["kernel"] == backend and loaded.kind == "artifact"
    # 4-bit codes are resident, not float weights: most of the Linears' 4 bytes per weight go
    dense = load_model(str(tiny64))
    linear_bytes = sum(m.weight.numel() * 4 for name, m in dense.model.named_modules()
                       if isinstance(m, torch.nn.Linear) and "layers." in name)
    assert dense.weight_bytes - loaded.weight_bytes > 0.7 * linear_bytes

    evaluated, generated = _eval_and_generate(out, eval_file, capsys, monkeypatch)
    # the reloaded artifact scores exactly what the quantizer measured on its in-memory model
    assert evaluated["perplexity"] == pytest.approx(quantized["perplexity_after"], rel=1e-5)
    assert generated["tokens"] == 8
    assert generated["text"] == _greedy_text(loaded.model, loaded.tokenizer, 8)


def _fake_artifact(tiny64: Path, tmp_path: Path, fmt: str) -> Path:
    """A folder that says it is a ``fmt`` artifact; the package check comes before any read."""
    import shutil

    folder = tmp_path / fmt
    shutil.copytree(tiny64, folder)
    (folder / "openpto.json").write_text(json.dumps({"format": fmt, "backend": fmt}))
    return folder


@pytest.mark.parametrize(("fmt", "modules", "line"), [
    ("bitsandbytes", ["bitsandbytes"],
     "error: bitsandbytes is needed for bitsandbytes artifacts but is not installed: "
     "pip install 'openpto[backends]'"),
    ("quanto", ["optimum.quanto"],
     "error: optimum-quanto is needed for quanto artifacts but is not installed: "
     "pip install 'openpto[backends]'"),
])
def test_missing_library_is_one_line_naming_the_package(
        fmt: str, modules: list[str], line: str, tiny64: Path, eval_file: Path, tmp_path: Path,
        tmp_db: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _fake_artifact(tiny64, tmp_path, fmt)
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    for args in (["eval", str(folder), "--text", str(eval_file), "--seq-len", "64"],
                 ["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "2"]):
        code, out, err = run_opt([*args, "--json"], capsys, monkeypatch)
        assert code != 0 and out == ""
        assert err.strip().splitlines()[-1] == line
        assert "Traceback" not in err
    runs = Store().query_readonly("select kind, status, error from runs order by started_at")
    assert [(r["kind"], r["status"]) for r in runs] == [("eval", "failed"), ("generate", "failed")]
    assert all(line.removeprefix("error: ") in r["error"] for r in runs)


def test_quanto_artifact_refuses_another_dtype_in_one_line(
        tiny64: Path, eval_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("optimum.quanto")
    from openpto.errors import UsageError
    from openpto.models import load_model

    out = tmp_path / "q8"
    _quantize(tiny64, None, out, method="rtn", bits=8, backend="quanto")
    with pytest.raises(UsageError, match=r"saved in float32; .* pass --dtype float32"):
        load_model(str(out), dtype="bfloat16")
