"""Sparsity measured by ``opt eval`` and the 2:4 path chosen when a 2:4 artifact is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from openpto.store import Store
from tests.helpers import run_opt

CUDA = torch.cuda.is_available() and torch.backends.cusparselt.is_available()
# tiny_llama: 2 layers of q 64x64, k and v 32x64, o 64x64, gate and up 128x64, down 64x128
LINEAR_PARAMS = 2 * (4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    return save_model(tiny_llama(seed=7), tiny_tokenizer(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from openpto.data import load_text

    folder = tmp_path_factory.mktemp("texts")
    calib, held_out = folder / "calib.txt", folder / "held-out.txt"
    calib.write_text(load_text("pydoc-topics").text[:8_000], encoding="utf-8")
    held_out.write_text(load_text("stdlib-docstrings").text[:6_000], encoding="utf-8")
    return calib, held_out


def _prune(folder: Path, out: Path, config: Any, calib: Path | None = None) -> dict[str, Any]:
    from openpto.pipeline.sparsify import sparsify
    from openpto.pipeline.workflow import CalibrationOptions, SparsifyOptions

    calibration = CalibrationOptions(text=None if calib is None else str(calib), samples=4,
                                     seq_len=32)
    return sparsify(str(folder), config, SparsifyOptions(calibration=calibration, output=out),
                    store=Store(out.parent / "prune.db")).to_dict()


@pytest.fixture(scope="module")
def artifact_24(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openpto.core.sparsity import MagnitudeConfig

    out = tmp_path_factory.mktemp("a24") / "m24"
    _prune(tiny_folder, out, MagnitudeConfig(pattern="2:4"))
    return out


def test_eval_shows_and_records_the_sparsity_of_a_24_artifact(
    artifact_24: Path, texts: tuple[Path, Path], tmp_db: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = run_opt(["eval", str(artifact_24), "--text", str(texts[1]), "--seq-len",
                              "64", "--max-tokens", "256", "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    # Random weights hold no exact zeros, so 2:4 magnitude pruning leaves exactly half.
    assert result["sparsity"] == 0.5
    assert result["nm_compliant"] == {"2:4": True, "4:8": True}
    assert result["linear_params"] == LINEAR_PARAMS
    assert result["nonzero_linear_params"] == LINEAR_PARAMS // 2

    metrics = {m["name"]: m for m in Store().rows("metrics")}
    assert metrics["sparsity"]["value"] == 0.5 and metrics["sparsity"]["unit"] == "fraction"
    details = json.loads(metrics["sparsity"]["details"])
    assert details["zeros"] == LINEAR_PARAMS // 2 and details["linears"] == 14
    assert details["artifact_pattern"] == "2:4" and details["artifact_target"] == 0.5
    assert set(details["layers"].values()) == {0.5}
    assert "model.layers.1.mlp.down_proj" in details["layers"]
    assert metrics["nonzero_linear_params"]["value"] == LINEAR_PARAMS // 2


def test_unstructured_and_dense_models(tiny_folder: Path, tmp_path: Path) -> None:
    from openpto.core.sparsity import MagnitudeConfig
    from openpto.pipeline.evaluate import EvalConfig, evaluate

    out = tmp_path / "m50"
    _prune(tiny_folder, out, MagnitudeConfig(sparsity=0.5))
    store = Store(tmp_path / "eval.db")
    pruned = evaluate(str(out), EvalConfig(text="pydoc-topics", seq_len=64, max_tokens=128),
                      store=store).to_dict()
    assert pruned["sparsity"] == 0.5  # round(numel / 2) zeros in every Linear, all even sizes
    assert pruned["nm_compliant"] == {"2:4": False, "4:8": False}
    assert pruned["nonzero_linear_params"] == LINEAR_PARAMS // 2

    dense = evaluate(str(tiny_folder),
                     EvalConfig(text="pydoc-topics", seq_len=64, max_tokens=128),
                     store=store).to_dict()
    assert dense["sparsity"] == 0.0
    assert dense["nm_compliant"] == {"2:4": False, "4:8": False}
    assert dense["nonzero_linear_params"] == dense["linear_params"] == LINEAR_PARAMS


def test_packed_sparse_artifact_is_measured_from_its_stored_weights(
    tiny_folder: Path, texts: tuple[Path, Path], tmp_path: Path,
) -> None:
    from openpto.core.sparsity import SparseGPTConfig
    from openpto.pipeline.evaluate import EvalConfig, evaluate

    out = tmp_path / "joint"
    _prune(tiny_folder, out, SparseGPTConfig(pattern="2:4", bits=4, group_size=32), texts[0])
    meta = json.loads((out / "openpto.json").read_text())
    assert meta["format"] == "pack-quantized"
    result = evaluate(str(out), EvalConfig(text="pydoc-topics", seq_len=64, max_tokens=128),
                      store=Store(tmp_path / "eval.db")).to_dict()
    # Every Linear is packed: the numbers come from the artifact's codes, dequantized.
    assert result["linear_params"] == LINEAR_PARAMS
    assert result["sparsity"] == pytest.approx(meta["sparsity"]["measured"], abs=1e-12)
    assert result["sparsity"] >= 0.5
    assert result["nm_compliant"]["2:4"] is True


def test_sparse24_is_asked_for_only_on_cuda_with_a_24_artifact() -> None:
    from openpto.models.artifact_loaders import wants_sparse24

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    p24 = {"sparsity": {"pattern": "2:4", "layers": {"0": 0.5, "1": 0.5}}}
    assert wants_sparse24(p24, cuda)
    assert not wants_sparse24(p24, cpu)
    assert not wants_sparse24({"sparsity": {"pattern": "unstructured"}}, cuda)
    assert not wants_sparse24({}, cuda)


def test_swap_artifact_on_cpu_swaps_nothing_and_says_why_for_each_24_linear() -> None:
    from openpto.core.sparsity.masks import nm_mask
    from openpto.kernels.sparse24 import swap_artifact

    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    with torch.no_grad():
        for layer in model[:2]:
            layer.weight.mul_(nm_mask(layer.weight.abs(), 2, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p24 = {"sparsity": {"pattern": "2:4", "layers": {"0": 0.5, "1": 0.5}}}
    outcome = swap_artifact(model, p24)
    # Only the Linears the artifact names are considered, and none can run sparse on CPU.
    assert set(outcome) == {"0", "1"}
    assert all(v == "dense: 2:4 semi-structured kernels need CUDA, the weight is on cpu"
               for v in outcome.values())
    assert swap_artifact(model, {"sparsity": {"pattern": "unstructured"}}) == {}
    assert swap_artifact(model, {}) == {}
    assert all(type(m) is nn.Linear for m in model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_use_sparse24_leaves_a_cpu_model_untouched(artifact_24: Path) -> None:
    from openpto.models import load_model
    from openpto.models.artifact_loaders import use_sparse24

    loaded = load_model(str(artifact_24))
    metadata = loaded.metadata
    assert metadata["sparsity"]["pattern"] == "2:4" and loaded.device.type == "cpu"
    assert use_sparse24(loaded) is loaded and loaded.metadata is metadata


def test_a_24_artifact_loads_dense_on_cpu(artifact_24: Path) -> None:
    from openpto.models import load_model

    loaded = load_model(str(artifact_24))
    assert "sparse24" not in loaded.metadata and "kernel" not in loaded.metadata
    assert all(type(m) is nn.Linear for name, m in loaded.model.named_modules()
               if name.endswith("_proj"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA with cuSPARSELt")
def test_a_24_artifact_on_cuda_takes_the_semi_structured_path(
    artifact_24: Path, texts: tuple[Path, Path], tmp_path: Path,
) -> None:
    from openpto.kernels.sparse24 import KERNEL_NAME, Sparse24Linear
    from openpto.models import load_model
    from openpto.pipeline.evaluate import EvalConfig, evaluate

    loaded = load_model(str(artifact_24), device="cuda", dtype="bfloat16")
    verdicts = loaded.metadata["sparse24"]
    assert len(verdicts) == 14
    # Tuned: each shape is kept sparse only where it measured faster, and says so either way.
    for name, verdict in verdicts.items():
        module = loaded.model.get_submodule(name)
        assert (verdict == KERNEL_NAME) == isinstance(module, Sparse24Linear), (name, verdict)
        assert verdict == KERNEL_NAME or verdict.startswith("dense: ")
    swapped = sum(v == KERNEL_NAME for v in verdicts.values())
    assert loaded.metadata["kernels"].get(KERNEL_NAME, 0) == swapped

    store = Store(tmp_path / "gpu.db")
    on_gpu = evaluate(str(artifact_24), EvalConfig(text=str(texts[1]), seq_len=64,
                                                   max_tokens=256, device="cuda",
                                                   dtype="bfloat16"), store=store).to_dict()
    on_cpu = evaluate(str(artifact_24), EvalConfig(text=str(texts[1]), seq_len=64,
                                                   max_tokens=256), store=store).to_dict()
    assert on_gpu["sparsity"] == on_cpu["sparsity"] == 0.5
    details = json.loads(store.db.execute(
        "select details from metrics where run_id = ? and name = 'perplexity'",
        [on_gpu["run_id"]]).fetchone()[0])
    # Each load times the shapes afresh, so only the set of Linears is sure to repeat.
    assert set(details["sparse24"]) == set(verdicts)
    assert details["kernels"].get(KERNEL_NAME, 0) == sum(
        v == KERNEL_NAME for v in details["sparse24"].values())
    assert on_gpu["perplexity"] == pytest.approx(on_cpu["perplexity"], rel=2e-2)
