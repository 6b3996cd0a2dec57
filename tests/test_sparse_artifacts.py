"""Sparse artifacts in compressed-tensors' sparse layouts: exact layout, its own bitmask code and
(where installed) its own decompressor, our loader, sizes and ``--dry-run`` estimates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from openpto.store import Store
from tests.helpers import run_opt


def _pruned(config: Any, seed: int = 5, hidden: int = 96, inter: int = 192):  # type: ignore[no-untyped-def]
    """A tiny model pruned in memory (magnitude: no calibration) and rounded to what the
    artifact stores, with its sparse layout."""
    from openpto.core.sparsity import summarize
    from openpto.core.sparsity.transforms import sparsify_model
    from openpto.pipeline.artifacts import SparseLayout, round_to_stored
    from tests.helpers import tiny_llama, tiny_tokenizer

    model = tiny_llama(hidden_size=hidden, intermediate_size=inter, seed=seed)
    result = sparsify_model(model, config, None)
    stored = round_to_stored(model, result.quantized_weights())
    params = dict(model.named_parameters())
    names = tuple(r.name for r in result.reports)
    summary = summarize(((n, params[f"{n}.weight"].detach()) for n in names), config.nm)
    return model, tiny_tokenizer(), stored, SparseLayout(config.label, names, summary.sparsity)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize(("pattern", "fmt"), [(None, "sparse-bitmask"),
                                              ("2:4", "sparse-24-bitmask")])
def test_the_layout_is_compressed_tensors_and_its_bitmask_code_reads_it_exactly(
    tmp_path: Path, pattern: str | None, fmt: str,
) -> None:
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.utils import unpack_bitmasks

    from openpto.core.sparsity import MagnitudeConfig
    from openpto.pipeline.artifacts import write_artifact

    config = MagnitudeConfig(sparsity=None if pattern else 0.5, pattern=pattern)
    model, tok, _, layout = _pruned(config)
    info = write_artifact(model, tok, tmp_path / "art", {}, {"note": "test"}, sparsity=layout)
    assert info.format == fmt
    meta = json.loads((tmp_path / "art/openpto.json").read_text())
    assert meta["format"] == meta["sparse_format"] == fmt and meta["float_dtype"] == "bfloat16"
    qconfig = json.loads((tmp_path / "art/config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    # compressed-tensors' own config class accepts it as it is.
    parsed = SparsityCompressionConfig.load_from_registry(fmt, **qconfig["sparsity_config"])
    assert parsed.format == fmt and parsed.ignore == ["lm_head"]
    assert parsed.sparsity_structure == ("2:4" if pattern else "unstructured")
    assert parsed.global_sparsity == pytest.approx(0.5)

    tensors = _tensors(tmp_path / "art")
    state = model.state_dict()
    for name in layout.targets:
        weight = state[f"{name}.weight"].bfloat16()
        rows, cols = weight.shape
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.shape"].flatten().tolist() == [rows, cols]
        assert tensors[f"{name}.shape"].dtype == torch.int64
        assert tensors[f"{name}.bitmask"].dtype == torch.uint8
        assert tuple(tensors[f"{name}.bitmask"].shape) == (rows, -(-cols // 8))
        values = tensors[f"{name}.compressed"]
        assert values.dtype == torch.bfloat16
        if pattern:
            assert tuple(values.shape) == (rows, cols // 2)
            assert tuple(tensors[f"{name}.shape"].shape) == (2, 1)
        else:
            counts = (weight != 0).sum(dim=1)
            assert torch.equal(tensors[f"{name}.row_offsets"], torch.cumsum(counts, 0) - counts)
        # compressed-tensors' bitmask decompression: values scattered where the bits are set.
        mask = unpack_bitmasks(tensors[f"{name}.bitmask"], [rows, cols])
        dense = torch.zeros((rows, cols), dtype=values.dtype)
        dense[mask] = values.flatten()
        assert torch.equal(dense, weight), name
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(tensors[name], state[name].bfloat16())


# compressed-tensors 0.14 is the last release with sparse decompressors; `make install` puts it
# in a side folder of the venv (off its path, so the installed release stays what runs).
SIDE_COMPRESSED_TENSORS = Path(sys.prefix) / "side" / "compressed-tensors-0.14"

DECOMPRESS = """
import sys
from compressed_tensors.compressors import ModelCompressor
from safetensors.torch import save_file

folder, out = sys.argv[1], sys.argv[2]
compressor = ModelCompressor.from_pretrained(folder)
assert compressor is not None and compressor.sparsity_compressor is not None, "no sparse compressor"
import compressed_tensors
print(compressed_tensors.__version__, type(compressor.sparsity_compressor).__name__)
weights = dict(compressor.sparsity_compressor.decompress(folder))
save_file({name: t.contiguous() for name, t in weights.items()}, out)
"""


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_compressed_tensors_decompressor_gives_back_the_pruned_weights(
    tmp_path: Path, pattern: str | None,
) -> None:
    if not (SIDE_COMPRESSED_TENSORS / "compressed_tensors").is_dir():
        pytest.skip(f"no compressed-tensors 0.14 in {SIDE_COMPRESSED_TENSORS} "
                    "(a venv made before `make install` added it; run make install)")
    from safetensors.torch import load_file

    from openpto.core.sparsity import MagnitudeConfig
    from openpto.pipeline.artifacts import write_artifact

    model, tok, _, layout = _pruned(MagnitudeConfig(sparsity=None if pattern else 0.5,
                                                    pattern=pattern))
    write_artifact(model, tok, tmp_path / "art", {}, {}, sparsity=layout)
    # The side folder first, the venv's transformers and torch behind it.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SIDE_COMPRESSED_TENSORS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run(
        [sys.executable, "-c", DECOMPRESS, str(tmp_path / "art"), str(tmp_path / "out.st")],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    version, compressor = done.stdout.split()[-2:]
    assert version == "0.14.0.1"
    assert compressor == ("Sparse24BitMaskCompressor" if pattern else "BitmaskCompressor")
    decompressed = load_file(str(tmp_path / "out.st"))
    state = model.state_dict()
    assert {f"{name}.weight" for name in layout.targets} <= set(decompressed)
    for name in layout.targets:
        got, want = decompressed[f"{name}.weight"], state[f"{name}.weight"].bfloat16()
        assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_our_loader_reads_the_artifact_and_computes_the_same_logits(
    tmp_path: Path, pattern: str | None,
) -> None:
    from openpto.core.sparsity import MagnitudeConfig
    from openpto.models import load_model
    from openpto.pipeline.artifacts import write_artifact

    model, tok, _, layout = _pruned(MagnitudeConfig(sparsity=None if pattern else 0.5,
                                                    pattern=pattern))
    write_artifact(model, tok, tmp_path / "art", {}, {}, sparsity=layout)
    loaded = load_model(str(tmp_path / "art"))
    assert loaded.metadata["sparse_format"] == layout.format_for({})
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        got = loaded.model(ids).logits
    assert torch.equal(got, ref)
    in_bf16 = load_model(str(tmp_path / "art"), dtype="auto")
    assert in_bf16.dtype == torch.bfloat16
    assert torch.equal(in_bf16.model.model.layers[0].mlp.down_proj.weight.float(),
                       model.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparse_artifacts_shrink_and_dry_run_estimates_them(
    tmp_path: Path, pattern: str | None,
) -> None:
    from openpto.core.sparsity import MagnitudeConfig
    from openpto.pipeline.artifacts import SparseLayout, planned_size, write_artifact

    # Embeddings small beside the Linears, as in real models.
    model, tok, _, layout = _pruned(MagnitudeConfig(sparsity=None if pattern else 0.5,
                                                    pattern=pattern), hidden=256, inter=512)
    sparse = write_artifact(model, tok, tmp_path / "sparse", {}, {}, sparsity=layout)
    dense = write_artifact(model, tok, tmp_path / "dense", {}, {},
                           sparsity=SparseLayout(layout.structure, layout.targets,
                                                 layout.sparsity, compress=False))
    assert dense.format == "dense"
    assert "quantization_config" not in json.loads((tmp_path / "dense/config.json").read_text())
    # 2 bytes a weight dense; kept half at 2 bytes plus one bit a weight compressed.
    assert sparse.size_bytes < 0.7 * dense.size_bytes
    plan = SparseLayout(layout.structure, layout.targets, 0.5)
    planned = planned_size(model, tok, {}, torch.float16, {}, sparsity=plan)
    assert abs(planned - sparse.size_bytes) / sparse.size_bytes < 0.01


def test_joint_sparse_and_int4_artifact_describes_its_sparsity(tmp_path: Path) -> None:
    from openpto.core.sparsity import SparseGPTConfig
    from openpto.core.sparsity.transforms import sparsify_model
    from openpto.kernels import QuantLinear
    from openpto.models import load_model
    from openpto.pipeline.artifacts import (
        SparseLayout,
        WeightPlan,
        planned_size,
        round_to_stored,
        write_artifact,
    )
    from tests.helpers import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(hidden_size=96, intermediate_size=192, seed=2), tiny_tokenizer()
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    config = SparseGPTConfig(pattern="2:4", bits=4, group_size=32)
    result = sparsify_model(model, config, calib)
    quantized = round_to_stored(model, result.quantized_weights())
    layout = SparseLayout("2:4", tuple(r.name for r in result.reports), 0.5)
    plans = {n: WeightPlan.of(q) for n, q in quantized.items()}
    planned = planned_size(model, tok, plans, torch.float16, {}, sparsity=layout)
    info = write_artifact(model, tok, tmp_path / "art", quantized, {}, sparsity=layout)
    assert info.format == "pack-quantized"
    assert abs(planned - info.size_bytes) / info.size_bytes < 0.01
    qconfig = json.loads((tmp_path / "art/config.json").read_text())["quantization_config"]
    # compressed-tensors keeps a bitmask over float or 8-bit values only: the int4 codes stay
    # packed and the sparsity config says what they hold.
    assert qconfig["format"] == "pack-quantized"
    assert qconfig["sparsity_config"]["format"] == "dense"
    assert qconfig["sparsity_config"]["sparsity_structure"] == "2:4"
    loaded = load_model(str(tmp_path / "art"))
    assert len([m for m in loaded.model.modules() if isinstance(m, QuantLinear)]) == 14
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        got = loaded.model(ids).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_opt_sparsify_writes_a_bitmask_artifact_that_opt_eval_runs(
    tmp_path: Path, tmp_db: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    source = save_model(tiny_llama(seed=7), tiny_tokenizer(), tmp_path / "tiny")
    out = tmp_path / "m50"
    code, stdout, err = run_opt(["sparsify", str(source), "--method", "magnitude",
                                 "--sparsity", "0.5", "--output", str(out), "--json"],
                                capsys, monkeypatch)
    assert code == 0, err
    pruned = json.loads(stdout)
    meta = json.loads((out / "openpto.json").read_text())
    assert meta["format"] == meta["sparse_format"] == "sparse-bitmask"
    source_bytes = (source / "model.safetensors").stat().st_size
    assert pruned["size_bytes_after"] < 0.5 * source_bytes
    code, stdout, err = run_opt(["eval", str(out), "--text", "pydoc-topics", "--seq-len", "64",
                                 "--max-tokens", "128", "--json"], capsys, monkeypatch)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["sparsity"] == 0.5 and result["nm_compliant"] == {"2:4": False, "4:8": False}
    assert Store().rows("runs")[-1]["status"] == "succeeded"


def test_a_corrupt_sparse_artifact_fails_with_one_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from openpto.core.sparsity import MagnitudeConfig
    from openpto.errors import CorruptFile
    from openpto.models import load_model
    from openpto.pipeline.artifacts import write_artifact

    model, tok, _, layout = _pruned(MagnitudeConfig(sparsity=0.5))
    write_artifact(model, tok, tmp_path / "art", {}, {}, sparsity=layout)
    tensors = _tensors(tmp_path / "art")
    del tensors["model.layers.0.mlp.up_proj.row_offsets"]
    save_file(tensors, str(tmp_path / "art/model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptFile, match="up_proj lacks row_offsets of the sparse-bitmask"):
        load_model(str(tmp_path / "art"))


def test_gguf_export_of_a_sparse_artifact_keeps_the_pruned_weights(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from openpto.core.sparsity import MagnitudeConfig
    from openpto.pipeline.artifacts import write_artifact
    from openpto.pipeline.export import export_artifact

    model, tok, _, layout = _pruned(MagnitudeConfig(sparsity=0.5))
    write_artifact(model, tok, tmp_path / "art", {}, {}, sparsity=layout)
    out = tmp_path / "gguf" / "m.gguf"
    out.parent.mkdir()
    export_artifact(tmp_path / "art", "gguf", out, "f16", store=Store(tmp_path / "x.db"))
    state = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name,
                                                 dtype=torch.float32).state_dict()
    ours = model.state_dict()
    for name in layout.targets:
        # bfloat16 weights of this size are exact in float16.
        assert torch.equal(state[f"{name}.weight"], ours[f"{name}.weight"]), name
