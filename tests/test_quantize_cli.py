"""opt quantize / opt export through the real entry point: one JSON object on stdout with the
SPEC keys, progress on stderr, one-line errors, failed runs recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openpto.store import Store
from tests.helpers import run_opt

QUANTIZE_KEYS = {"output", "method", "bits", "group_size", "size_bytes_before",
                 "size_bytes_after", "seconds", "run_id"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    return save_model(tiny_llama(seed=4), tiny_tokenizer(), tmp_path_factory.mktemp("tiny"))


def test_quantize_json_then_export_json(tiny_folder: Path, tmp_path: Path, tmp_db: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    eval_file = tmp_path / "eval.txt"
    from openpto.data import load_text

    eval_file.write_text(load_text("stdlib-docstrings").text[:3000])
    out = tmp_path / "art"
    code, stdout, err = run_opt(
        ["quantize", str(tiny_folder), "--method", "gptq", "--bits", "4", "--group-size", "32",
         "--asym", "--samples", "4", "--calib-seq-len", "32", "--output", str(out),
         "--eval", str(eval_file), "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert stdout.count("\n") == 1
    result = json.loads(stdout)
    assert set(result) >= QUANTIZE_KEYS | {"perplexity_before", "perplexity_after"}
    assert (result["method"], result["bits"], result["group_size"]) == ("gptq", 4, 32)
    assert result["output"] == str(out) and (out / "openpto.json").is_file()
    assert "quantize" in err  # the per-layer progress bar went to stderr

    code, stdout, err = run_opt(["export", str(out), "--format", "gguf", "--output",
                                 str(tmp_path / "m.gguf"), "--json"], capsys, monkeypatch)
    assert code == 0, err
    exported = json.loads(stdout)
    assert set(exported) >= {"output", "format", "size_bytes"}
    assert exported["format"] == "gguf" and exported["type"] == "q4_1"
    assert exported["size_bytes"] == (tmp_path / "m.gguf").stat().st_size

    code, stdout, _ = run_opt(["models", "list", "--json"], capsys, monkeypatch)
    (row,) = json.loads(stdout)
    assert row["path"] == str(out.resolve()) and row["method"] == "gptq"
    kinds = sorted((r["kind"], r["status"]) for r in Store().rows("runs"))
    assert kinds == [("export", "succeeded"), ("quantize", "succeeded")]


def test_dry_run_prints_the_size_and_writes_nothing(tiny_folder: Path, tmp_path: Path,
                                                    tmp_db: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    code, stdout, err = run_opt(
        ["quantize", str(tiny_folder), "--method", "rtn", "--bits", "8", "--output",
         str(tmp_path / "art"), "--dry-run", "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["dry_run"] is True and result["group_size"] is None
    assert 0 < result["size_bytes_after"] < result["size_bytes_before"]
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--group-size", "48"], "group size must be one of 32, 64, 128"),
        (["--backend", "bitsandbytes", "--method", "nf4", "--bits", "3"],
         "cannot quantize to 3 bits"),
        (["--group-size", "wide"], "'wide' is not a number"),
        (["--method", "awq", "--no-float-targets"], "the awq config has no field 'float_targets'"),
        (["--method", "sparsegpt"], "unknown quantization method 'sparsegpt'"),
        (["--backend", "quanto", "--method", "gptq"], "the quanto backend has no method 'gptq'"),
    ],
)
def test_bad_options_fail_with_one_line(args: list[str], message: str, tiny_folder: Path,
                                        tmp_path: Path, tmp_db: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, stdout, err = run_opt(["quantize", str(tiny_folder), "--output", str(tmp_path / "a"),
                                 *args, "--json"], capsys, monkeypatch)
    assert code != 0 and stdout == ""
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_export_of_a_missing_artifact_fails_cleanly(tmp_path: Path, tmp_db: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    code, stdout, err = run_opt(["export", str(tmp_path / "nothing"), "--format", "gguf",
                                 "--output", str(tmp_path / "m.gguf"), "--json"], capsys,
                                monkeypatch)
    assert code != 0 and stdout == ""
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "is not a folder" in line
    (run,) = Store().rows("runs")
    assert (run["kind"], run["status"]) == ("export", "failed")


def test_help_has_examples(capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    for command in ("quantize", "export"):
        code, stdout, _ = run_opt([command, "--help"], capsys, monkeypatch)
        assert code == 0 and "Example: opt " + command in stdout


def test_float_dtype_sets_the_storage_of_the_float_tensors(
    tiny_folder: Path, tmp_path: Path, tmp_db: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "f16"
    code, _, err = run_opt(["quantize", str(tiny_folder), "--method", "rtn", "--bits", "8",
                            "--float-dtype", "float16", "--output", str(out), "--json"],
                           capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((out / "openpto.json").read_text())["float_dtype"] == "float16"
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors["model.norm.weight"].dtype == torch.float16

    code, stdout, err = run_opt(["quantize", str(tiny_folder), "--method", "rtn", "--bits", "8",
                                 "--float-dtype", "double", "--output", str(tmp_path / "bad"),
                                 "--json"], capsys, monkeypatch)
    assert code == 2 and stdout == ""
    (line,) = err.strip().splitlines()
    assert line == ("error: float_dtype must be one of bfloat16, float16, float32, keep, "
                    "not 'double'")
    assert not (tmp_path / "bad").exists()
