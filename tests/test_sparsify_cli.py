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


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor by name, the pruned ones decompressed where the layout is sparse."""
    from safetensors.torch import load_file

    return {**load_file(str(folder / "model.safetensors")), **_weights(folder)}


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


@pytest.mark.parametrize("sparse_format", ["compressed", "dense"])
@pytest.mark.parametrize("shape", [["--sparsity", "0.5"], ["--pattern", "2:4"]])
def test_dry_run_plans_the_written_size_within_one_percent(
    tiny_folder: Path, tmp_path: Path, tmp_db: Path, sparse_format: str, shape: list[str],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = ["sparsify", str(tiny_folder), "--method", "magnitude", *shape,
            "--sparse-format", sparse_format, "--output", str(tmp_path / "art"), "--json"]
    code, stdout, stderr = run_opt([*args, "--dry-run"], capsys, monkeypatch)
    assert code == 0, stderr
    planned = json.loads(stdout)
    assert planned["dry_run"] is True
    assert not (tmp_path / "art").exists()
    assert planned["sparsity"] == planned["target_sparsity"] == 0.5
    assert planned["nm_compliant"] is None  # nothing was measured

    code, stdout, stderr = run_opt(args, capsys, monkeypatch)
    assert code == 0, stderr
    written = json.loads(stdout)
    assert "dry_run" not in written
    size = written["size_bytes_after"]
    assert abs(planned["size_bytes_after"] - size) / size < 0.01
    assert planned["params_pruned"] == written["params_pruned"]
    assert planned["sparse_bytes"] == written["sparse_bytes"]

    # The choice is recorded in the run config and in the artifact.
    fmt = ("sparse-24-bitmask" if "2:4" in shape else "sparse-bitmask") \
        if sparse_format == "compressed" else "dense"
    meta = json.loads((tmp_path / "art/openpto.json").read_text())
    assert meta["format"] == meta["sparse_format"] == fmt
    assert meta["sparsity"]["storage"] == sparse_format
    for run_id in (planned["run_id"], written["run_id"]):
        (config,) = Store().db.execute("select config from runs where id = ?",
                                       [run_id]).fetchone()
        assert json.loads(config)["sparse_format"] == sparse_format
        assert json.loads(config)["dry_run"] is (run_id == planned["run_id"])


def test_dense_sparse_format_is_a_folder_plain_transformers_reads_exactly(
    tiny_folder: Path, tmp_path: Path, tmp_db: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import AutoModelForCausalLM

    from openpto.core.sparsity import nm_compliant

    folders = {}
    for sparse_format in ("dense", "compressed"):
        out = folders[sparse_format] = tmp_path / sparse_format
        code, _, stderr = run_opt(
            ["sparsify", str(tiny_folder), "--method", "magnitude", "--pattern", "2:4",
             "--sparse-format", sparse_format, "--output", str(out), "--json"],
            capsys, monkeypatch)
        assert code == 0, stderr
    dense = folders["dense"]
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    meta = json.loads((dense / "openpto.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.float32)
    # The same pruning stored compressed, read back by our decompression.
    compressed = _weights(folders["compressed"])
    stored = _all_tensors(dense)
    assert len(meta["sparsity"]["layers"]) == len(compressed) == 14
    for name, fraction in meta["sparsity"]["layers"].items():
        weight = plain.get_submodule(name).weight.detach()
        assert stored[f"{name}.weight"].dtype == torch.bfloat16
        assert torch.equal(weight, compressed[f"{name}.weight"].float()), name
        assert nm_compliant(weight, 2, 4)
        assert (weight == 0).float().mean().item() == pytest.approx(fraction, abs=1e-6)
    assert (folders["compressed"] / "model.safetensors").stat().st_size \
        < (dense / "model.safetensors").stat().st_size


@pytest.mark.parametrize("sparse_format", ["compressed", "dense"])
def test_only_the_compressed_layout_warns_who_cannot_read_it(
    tiny_folder: Path, tmp_path: Path, tmp_db: Path, sparse_format: str,
) -> None:
    from openpto.core.sparsity import MagnitudeConfig
    from openpto.pipeline.sparsify import sparsify
    from openpto.pipeline.workflow import SparsifyOptions
    from openpto.progress import ProgressEvent, RunWarning

    events: list[ProgressEvent] = []
    sparsify(str(tiny_folder), MagnitudeConfig(sparsity=0.5),
             SparsifyOptions(output=tmp_path / "c", sparse_format=sparse_format),
             progress=events.append)
    warnings = [e for e in events if isinstance(e, RunWarning)]
    if sparse_format == "dense":
        assert warnings == []
    else:
        (warning,) = warnings
        assert warning.category == "sparse_format"
        assert "--sparse-format dense" in warning.message


@pytest.mark.parametrize(("float_dtype", "stored"), [("float16", torch.float16),
                                                     ("float32", torch.float32),
                                                     ("keep", torch.float32)])
def test_float_dtype_sets_the_storage_of_every_float_tensor(
    tiny_folder: Path, tmp_path: Path, tmp_db: Path, float_dtype: str, stored: torch.dtype,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from openpto.models import load_model

    out = tmp_path / "f"
    code, _, stderr = run_opt(
        ["sparsify", str(tiny_folder), "--method", "magnitude", "--sparsity", "0.5",
         "--float-dtype", float_dtype, "--output", str(out), "--json"], capsys, monkeypatch)
    assert code == 0, stderr
    assert json.loads((out / "openpto.json").read_text())["float_dtype"] == \
        str(stored).removeprefix("torch.")
    weights = _all_tensors(out)
    assert weights["model.embed_tokens.weight"].dtype == stored
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == stored
    # The float32 source model stored in float32 comes back bit for bit where not pruned.
    source = load_model(str(tiny_folder)).model.state_dict()
    assert torch.equal(weights["model.norm.weight"].float(),
                       source["model.norm.weight"].to(stored).float())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparse-format", "sparse"], "sparse_format must be one of compressed, dense, "
                                        "not 'sparse'"),
        (["--float-dtype", "int8"], "float_dtype must be one of bfloat16, float16, float32, "
                                    "keep, not 'int8'"),
        (["--float-dtype", "int8", "--dry-run"], "float_dtype must be one of"),
        (["--sparse-format", "", "--dry-run"], "sparse_format must be one of"),
    ],
)
def test_bad_storage_options_exit_2_with_one_line(
    tiny_folder: Path, tmp_path: Path, tmp_db: Path, args: list[str], message: str,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, stdout, stderr = run_opt(
        ["sparsify", str(tiny_folder), "--method", "magnitude", "--sparsity", "0.5", *args,
         "--output", str(tmp_path / "x"), "--json"], capsys, monkeypatch)
    assert code == 2 and stdout == ""
    (line,) = stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "x").exists()
