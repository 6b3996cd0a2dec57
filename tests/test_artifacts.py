"""Artifact folders: compressed-tensors layout read by the real consumer, packed loading, atomic
writes, output checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openpto.errors import UsageError


def _quantize_all(model, bits: int, group: int | None, symmetric: bool,  # type: ignore[no-untyped-def]
                  float_dtype: str | None = "bfloat16"):
    """RTN every decoder Linear; the model computes with what the artifact stores."""
    from openpto.core.quant.tensor import quantize_weight
    from openpto.pipeline.artifacts import round_to_stored
    from openpto.pipeline.backends.torch_backend import decoder_linears

    quantized = {name: quantize_weight(linear.weight.data, bits, group, symmetric)
                 for name, linear in decoder_linears(model).items()}
    return round_to_stored(model, quantized, float_dtype)


@pytest.fixture
def tiny():  # type: ignore[no-untyped-def]
    from tests.helpers import tiny_llama, tiny_tokenizer

    return tiny_llama(hidden_size=96, intermediate_size=192, seed=3), tiny_tokenizer()


@pytest.mark.parametrize(("bits", "group", "symmetric"),
                         [(4, 32, True), (4, 32, False), (8, None, True), (4, 96, False)])
def test_transformers_with_compressed_tensors_reads_our_weights_exactly(
    tiny, tmp_path: Path, bits: int, group: int | None, symmetric: bool  # type: ignore[no-untyped-def]
) -> None:
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from openpto.pipeline.artifacts import write_artifact

    model, tok = tiny
    quantized = _quantize_all(model, bits, group, symmetric)
    info = write_artifact(model, tok, tmp_path / "art", quantized, {"note": "test"})
    assert info.format == "pack-quantized"

    qconfig = json.loads((tmp_path / "art/config.json").read_text())["quantization_config"]
    schemes = list(qconfig["config_groups"].values())
    assert qconfig["ignore"] == ["lm_head"] and qconfig["format"] == "pack-quantized"
    if group == 96:
        # One group spans the whole 96-wide rows (per-channel) but not the 192-wide down_proj:
        # two schemes, each naming its modules.
        assert sorted(s["weights"]["strategy"] for s in schemes) == ["channel", "group"]
        assert all(t.startswith("re:") for s in schemes for t in s["targets"])
    else:
        (scheme,) = schemes
        assert scheme["targets"] == ["Linear"]
        assert scheme["weights"]["num_bits"] == bits
        assert scheme["weights"]["symmetric"] == symmetric
        assert scheme["weights"]["strategy"] == ("channel" if group is None else "group")

    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "art", quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=torch.float32,
    )
    state = loaded.state_dict()
    for name, qw in quantized.items():
        # compressed-tensors dequantizes in the scale dtype (float16): our weights at that
        # precision must come back bit for bit.
        assert torch.equal(state[f"{name}.weight"].to(torch.float16), qw.dequantize(torch.float16))
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] not in quantized:
            assert torch.equal(state[name], tensor), name
    meta = json.loads((tmp_path / "art/openpto.json").read_text())
    assert meta["format"] == "pack-quantized" and meta["note"] == "test"


def test_loading_an_artifact_swaps_in_packed_kernels(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from openpto.kernels import QuantLinear
    from openpto.models import load_model
    from openpto.pipeline.artifacts import write_artifact

    model, tok = tiny
    float_bytes = sum(p.numel() * 4 for p in model.parameters())
    quantized = _quantize_all(model, 4, 32, False)
    write_artifact(model, tok, tmp_path / "art", quantized, {})
    loaded = load_model(str(tmp_path / "art"))
    packed = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == len(quantized) == 14
    assert {m.kernel_name for m in packed} == {"packed-int4-cpu"}
    assert loaded.metadata["kernel"] == "packed-int4-cpu"
    assert loaded.weight_bytes < 0.75 * float_bytes  # embeddings stay float32 in this tiny model
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        got = loaded.model(ids).logits
    # The CPU int4 kernel computes in bfloat16: agreement at bfloat16 precision.
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_a_failure_mid_save_leaves_nothing_that_looks_complete(  # type: ignore[no-untyped-def]
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import safetensors.torch

    from openpto.errors import WriteError
    from openpto.pipeline.artifacts import write_artifact

    model, tok = tiny
    quantized = _quantize_all(model, 4, 32, True)
    written: list[Path] = []
    real_save = safetensors.torch.save_file

    def save_then_fail(tensors, filename, metadata=None):  # type: ignore[no-untyped-def]
        real_save(tensors, filename, metadata=metadata)
        written.append(Path(filename))
        raise OSError("no space left on device")

    # The weights are complete on disk when the fault strikes, openpto.json not yet.
    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(WriteError, match="no space left on device; nothing was left half-written"):
        write_artifact(model, tok, tmp_path / "art", quantized, {})
    assert len(written) == 1 and written[0].parent.name.startswith(".art.tmp-")
    assert not written[0].exists()
    assert list(tmp_path.iterdir()) == []


def test_rewriting_replaces_the_old_artifact_whole(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from openpto.pipeline.artifacts import write_artifact

    model, tok = tiny
    write_artifact(model, tok, tmp_path / "art", {}, {"round": 1})
    assert json.loads((tmp_path / "art/openpto.json").read_text())["format"] == "dense"
    write_artifact(model, tok, tmp_path / "art", _quantize_all(model, 8, None, True), {"round": 2})
    meta = json.loads((tmp_path / "art/openpto.json").read_text())
    assert (meta["round"], meta["format"]) == (2, "pack-quantized")
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_output_checks(tmp_path: Path) -> None:
    from openpto.pipeline.artifacts import check_output

    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_output(tmp_path / "file")
    with pytest.raises(UsageError, match="not a writable folder"):
        check_output(tmp_path / "file" / "below")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an openpto artifact"):
        check_output(tmp_path / "busy")
    check_output(tmp_path / "new" / "nested")  # creatable: fine
    assert not (tmp_path / "new" / "nested").exists()


@pytest.mark.parametrize("float_dtype", ["bfloat16", "float16", "float32", None])
def test_planned_size_matches_the_written_folder(tiny, tmp_path: Path, float_dtype) -> None:  # type: ignore[no-untyped-def]
    from openpto.pipeline.artifacts import WeightPlan, planned_size, write_artifact

    model, tok = tiny
    quantized = _quantize_all(model, 4, 32, False, float_dtype)
    plans = {n: WeightPlan.of(q) for n, q in quantized.items()}
    planned = planned_size(model, tok, plans, torch.float16, {"a": 1}, float_dtype=float_dtype)
    info = write_artifact(model, tok, tmp_path / "art", quantized, {"a": 1},
                          float_dtype=float_dtype)
    assert abs(planned - info.size_bytes) / info.size_bytes < 0.01


def test_float_tensors_are_stored_in_16_bits_and_recorded(tiny, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from safetensors import safe_open

    from openpto.pipeline.artifacts import write_artifact

    model, tok = tiny
    embedding = model.model.embed_tokens.weight.detach().clone()
    quantized = _quantize_all(model, 4, 32, False)
    # The model now computes with the stored (bfloat16-rounded) embedding.
    assert torch.equal(model.model.embed_tokens.weight, embedding.bfloat16().float())
    assert model.model.embed_tokens.weight.dtype == torch.float32
    write_artifact(model, tok, tmp_path / "art", quantized, {})
    config = json.loads((tmp_path / "art/config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "art/openpto.json").read_text())["float_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "art/model.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes["model.embed_tokens.weight"] == "BF16"
    assert dtypes["model.norm.weight"] == "BF16"
    assert {dtypes[k] for k in dtypes if k.endswith(".weight_scale")} == {"F16"}
    assert {dtypes[k] for k in dtypes if k.endswith(".weight_packed")} == {"I32"}

    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    write_artifact(model, tok, tmp_path / "keep", quantized, {}, float_dtype="keep")
    assert json.loads((tmp_path / "keep/config.json").read_text())["dtype"] == "float32"
    with pytest.raises(UsageError, match="unknown float_dtype 'int8'"):
        write_artifact(model, tok, tmp_path / "bad", quantized, {}, float_dtype="int8")
    assert not (tmp_path / "bad").exists()
    with torch.no_grad():
        model.model.norm.weight[0] = 1e5
    with pytest.raises(UsageError, match=r"norm\.weight holds values beyond float16's range"):
        write_artifact(model, tok, tmp_path / "f16", quantized, {}, float_dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "keep"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "auto"])
def test_a_16_bit_artifact_loads_at_the_dtype_asked_for_on_packed_kernels(  # type: ignore[no-untyped-def]
    tiny, tmp_path: Path, dtype: str,
) -> None:
    from openpto.kernels import QuantLinear
    from openpto.models import load_model
    from openpto.pipeline.artifacts import write_artifact

    model, tok = tiny
    write_artifact(model, tok, tmp_path / "art", _quantize_all(model, 4, 32, False), {})
    loaded = load_model(str(tmp_path / "art"), dtype=dtype)
    # "auto" is the artifact's own dtype, as its config.json records it.
    want = torch.float32 if dtype == "float32" else torch.bfloat16
    assert loaded.model.model.embed_tokens.weight.dtype == want
    assert torch.equal(loaded.model.model.embed_tokens.weight.float(),
                       model.model.embed_tokens.weight)
    assert len([m for m in loaded.model.modules() if isinstance(m, QuantLinear)]) == 14
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        got = loaded.model(ids).logits.float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
