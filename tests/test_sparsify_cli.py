from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openpto.store import Store
from tests.helpers import run_opt

SPEC_KEYS = {"output", "method", "sparsity", "pattern", "seconds", "run_id"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    return save_model(tiny_llama(seed=5), tiny_tokenizer(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from openpto.data import load_text

    folder = tmp_path_factory.mktemp("texts")
    calib, held_out = folder / "calib.txt", folder / "held-out.txt"
    calib.write_text(load_text("pydoc-topics").text[:12_000], encoding="utf-8")
    held_out.write_text(load_text("stdlib-docstrings").text[:6_000], encoding="utf-8")
    return calib, held_out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The stored weights, each pruned one decompressed from its sparse layout."""
    from openpto.models.sparse_format import read_sparse_weights

    return read_sparse_weights(folder)


def test_sparsify_json_round_trip_and_records(
    tiny_folder: Path, texts: tuple[Path, Path], tmp_path: Path, tmp_db: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    calib, held_out = texts
    out = tmp_path / "pruned"
    code, stdout, stderr = run_opt(
        ["sparsify", str(tiny_folder), "--method", "sparsegpt", "--pattern", "2:4",
         "--calib", str(calib), "--samples", "8", "--calib-seq-len", "64",
         "--output", str(out), "--eval", str(held_out), "--json"],
        capsys, monkeypatch,
    )
    assert code == 0, stderr
    result = json.loads(stdout)  # exactly one JSON object on stdout
    assert SPEC_KEYS | {"perplexity_before", "perplexity_after"} <= set(result)
    assert result["method"] == "sparsegpt" and result["pattern"] == "2:4"
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert result["nm_compliant"] is True
    assert result["speedup_bounds"]["compute"] == 2.0
    assert result["perplexity_after"] > result["perplexity_before"] * 0.9

    # The artifact records what was done and reloads with its mask intact.
    meta = json.loads((out / "openpto.json").read_text())
    assert meta["method"] == "sparsegpt" and meta["format"] == "sparse-24-bitmask"
    assert meta["sparsity"]["pattern"] == "2:4"
    assert meta["sparsity"]["measured"] == pytest.approx(result["sparsity"])
    from openpto.core.sparsity import nm_compliant
    from openpto.models import load_model
    from openpto.pipeline.evaluate import EvalConfig, evaluate

    loaded = load_model(str(out))
    stored = _weights(out)
    for name, layer in meta["sparsity"]["layers"].items():
        weight = loaded.model.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        assert nm_compliant(weight, 2, 4)
        assert torch.equal(weight == 0, stored[f"{name}.weight"] == 0)
        assert (weight == 0).float().mean().item() == pytest.approx(layer, abs=1e-6)
    again = evaluate(str(out), EvalConfig(text=str(held_out)))
    # The in-memory model computed with the stored (bfloat16) weights: the same numbers.
    assert again.perplexity == pytest.approx(result["perplexity_after"], rel=1e-6)

    store = Store()
    run = store.db.execute(
        "select kind, status from runs where id = ?", [result["run_id"]]).fetchone()
    assert run == ("sparsify", "succeeded")
    names = {r[0] for r in store.db.execute(
        "select name from metrics where run_id = ?", [result["run_id"]]).fetchall()}
    assert {"sparsity", "dense_bytes", "sparse_bytes", "speedup_bound_compute",
            "perplexity_before", "perplexity_after"} <= names
    traces = {r[0] for r in store.db.execute(
        "select name from traces where run_id = ?", [result["run_id"]]).fetchall()}
    assert {"load", "sparsify", "layer 0", "layer 1", "save"} <= traces
    rows = store.db.execute("select method, path from models").fetchall()
    assert rows == [("sparsegpt", str(out.resolve()))]


def test_joint_sparse_quantized_artifact_keeps_zeros(
    tiny_folder: Path, texts: tuple[Path, Path], tmp_path: Path, tmp_db: Path,
) -> None:
    from openpto.core.sparsity import SparseGPTConfig
    from openpto.models import load_model
    from openpto.models.artifact_loaders import read_packed_weights
    from openpto.pipeline.evaluate import EvalConfig, evaluate
    from openpto.pipeline.sparsify import sparsify
    from openpto.pipeline.workflow import CalibrationOptions, EvalOptions, SparsifyOptions

    calib, held_out = texts
    out = tmp_path / "joint"
    cfg = SparseGPTConfig(sparsity=0.5, bits=4, group_size=32)
    options = SparsifyOptions(
        calibration=CalibrationOptions(text=str(calib), samples=8, seq_len=64), output=out,
        evaluation=EvalOptions(text=str(held_out)))
    result = sparsify(str(tiny_folder), cfg, options)
    assert result.sparsity >= 0.5
    meta = json.loads((out / "openpto.json").read_text())
    assert meta["format"] == "pack-quantized"
    loaded = load_model(str(out))
    packed = read_packed_weights(out, None)
    assert len(packed) == 14
    for name, qw in packed.items():
        deq = qw.dequantize()
        assert (deq == 0).float().mean().item() == pytest.approx(
            meta["sparsity"]["layers"][name], abs=1e-6)
        assert (deq == 0).float().mean().item() >= 0.5 - 1e-3
    # The packed runtime computes what the in-memory model computed (fp16 scales included).
    assert loaded.metadata["kernels"]
    again = evaluate(str(out), EvalConfig(text=str(held_out)))
    assert result.perplexity_after is not None
    assert again.perplexity == pytest.approx(result.perplexity_after, rel=1e-3)


def test_magnitude_needs_no_calibration(
    tiny_folder: Path, tmp_path: Path, tmp_db: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, stdout, stderr = run_opt(
        ["sparsify", str(tiny_folder), "--method", "magnitude", "--sparsity", "0.3",
         "--output", str(tmp_path / "m"), "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert result["pattern"] == "unstructured"
    traces = {r[0] for r in Store().db.execute(
        "select name from traces where run_id = ?", [result["run_id"]]).fetchall()}
    assert "calibration data" not in traces


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "wanda", "--sparsity", "1.2"], "strictly between 0 and 1"),
        (["--method", "magnitude", "--sparsity", "0"], "strictly between 0 and 1"),
        (["--method", "magnitude", "--sparsity", "1"], "strictly between 0 and 1"),
        (["--method", "sparsegpt", "--sparsity", "-0.5"], "strictly between 0 and 1"),
        (["--method", "wanda", "--pattern", "4:4"], "smaller than M"),
        (["--method", "magnitude", "--pattern", "5:4"], "smaller than M"),
        (["--method", "magnitude", "--pattern", "0:4"], "at least 1"),
        (["--method", "magnitude", "--pattern", "2-4"], "must look like N:M"),
        (["--method", "magnitude", "--pattern", "1:6"], "not divisible by M=6"),
        (["--method", "wanda", "--pattern", "2:3"], "not divisible by M=3"),
        (["--method", "sparsegpt", "--pattern", "2:3"], "M=3 does not divide"),
        (["--method", "prune-it", "--sparsity", "0.5"], "unknown pruning method"),
        (["--method", "wanda", "--bits", "4"], "the wanda config has no field 'bits'"),
        (["--method", "wanda", "--sparsity", "0.5", "--pattern", "2:4"], "not both"),
    ],
)
def test_bad_input_is_one_clear_line(
    tiny_folder: Path, tmp_path: Path, tmp_db: Path, args: list[str], message: str,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, stdout, stderr = run_opt(
        ["sparsify", str(tiny_folder), *args, "--output", str(tmp_path / "x"), "--json"],
        capsys, monkeypatch)
    assert code != 0
    assert stdout == ""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert stderr.count("error") == 1
    assert not (tmp_path / "x").exists()


def test_help_has_an_example(capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    code, stdout, _ = run_opt(["sparsify", "--help"], capsys, monkeypatch)
    assert code == 0 and "Example: opt sparsify" in stdout
