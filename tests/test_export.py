"""opt export: GGUF blocks that gguf's own dequantizer and transformers' GGUF reader read back as
our weights, MLX folders mlx-lm reads, compressed-tensors copies, and clean failures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from openpto.errors import ConfigError, UsageError
from openpto.store import Store


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """GPTQ artifacts of one tiny Llama: 4-bit g32 symmetric and asymmetric, 4-bit g64."""
    from openpto.core.quant import GPTQConfig
    from openpto.models import save_model
    from openpto.pipeline.quantize import quantize
    from openpto.pipeline.workflow import CalibrationOptions, QuantizeOptions
    from tests.helpers import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("export")
    folder = save_model(tiny_llama(seed=11), tiny_tokenizer(), root / "tiny")
    store = Store(root / "opt.db")
    out = {}
    for name, kwargs in {"g32sym": dict(group_size=32, symmetric=True),
                         "g32asym": dict(group_size=32, symmetric=False),
                         "g64": dict(group_size=64, symmetric=False)}.items():
        out[name] = root / name
        quantize(str(folder), GPTQConfig(bits=4, **kwargs),  # type: ignore[arg-type]
                 QuantizeOptions(calibration=CalibrationOptions(samples=4, seq_len=32),
                                 output=out[name]), store=store)
    return out


def _export(artifact: Path, fmt: str, output: Path, qtype: str | None = None) -> dict:
    from openpto.pipeline.export import export_artifact

    return export_artifact(artifact, fmt, output, qtype, store=Store(output.parent / "x.db"))


def _packed(artifact: Path) -> dict:
    from openpto.models.artifact_loaders import read_packed_weights

    return read_packed_weights(artifact, None)


def test_gguf_q4_0_blocks_are_our_weights_exactly(artifacts: dict[str, Path],
                                                  tmp_path: Path) -> None:
    import gguf

    from openpto.pipeline.export import _permutation

    out = tmp_path / "m.gguf"
    result = _export(artifacts["g32sym"], "gguf", out)
    assert (result["type"], result["mapped_exactly"], result["requantized"]) == ("q4_0", 14, 0)
    assert result["size_bytes"] == out.stat().st_size
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    packed = _packed(artifacts["g32sym"])
    for index in range(2):
        for hf, name in (("mlp.down_proj", "ffn_down"), ("self_attn.v_proj", "attn_v"),
                         ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k")):
            t = tensors[f"blk.{index}.{name}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            ours = packed[f"model.layers.{index}.{hf}"].dequantize()
            if name in ("attn_q", "attn_k"):  # llama.cpp's rotary layout: rows permuted per head
                heads = 4 if name == "attn_q" else 2
                ours = ours[_permutation(ours.shape[0], heads)]
            assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), ours.numpy())
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"


def test_gguf_q4_1_keeps_every_code_and_rounds_only_the_minimum(artifacts: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    import gguf

    out = tmp_path / "m.gguf"
    result = _export(artifacts["g32asym"], "gguf", out)
    assert (result["type"], result["requantized"]) == ("q4_1", 0)
    t = {t.name: t for t in gguf.GGUFReader(out).tensors}["blk.1.mlp.down_proj.weight"
                                                            .replace("mlp.down_proj", "ffn_down")
                                                            .replace("model.layers.", "blk.")]
    qw = _packed(artifacts["g32asym"])["model.layers.1.mlp.down_proj"]
    got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
    # Q4_1 stores m = -zero * scale as float16: the only rounding, at most half a float16 ulp.
    m = -qw.zero * qw.scale
    bound = (m.abs() * 2.0**-11).repeat_interleave(32, dim=1) + 1e-7
    assert ((got - qw.dequantize()).abs() <= bound).all()


def test_transformers_reads_our_gguf_as_the_same_model(artifacts: dict[str, Path],
                                                       tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "m.gguf"
    _export(artifacts["g32sym"], "gguf", out, "q4_0")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name,
                                                 dtype=torch.float32)
    packed = _packed(artifacts["g32sym"])
    state = model.state_dict()
    # transformers undoes llama.cpp's Q/K permutation: names, shapes and rows all line up.
    for name, qw in packed.items():
        assert torch.equal(state[f"{name}.weight"], qw.dequantize()), name
    tok_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    tok_ours = AutoTokenizer.from_pretrained(artifacts["g32sym"])
    text = "def greet(name):\n    return f'Hello, {name}!'  # docs"
    assert tok_gguf(text)["input_ids"] == tok_ours(text)["input_ids"]


def test_gguf_of_a_g64_artifact_is_requantized_and_says_so(artifacts: dict[str, Path],
                                                          tmp_path: Path) -> None:
    result = _export(artifacts["g64"], "gguf", tmp_path / "m.gguf")
    assert (result["type"], result["mapped_exactly"], result["requantized"]) == ("q8_0", 0, 14)
    f16 = _export(artifacts["g64"], "gguf", tmp_path / "f.gguf", "f16")
    assert f16["size_bytes"] > result["size_bytes"]


def test_mlx_export_reuses_the_codes(artifacts: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import generate, load

    out = tmp_path / "mlx"
    result = _export(artifacts["g32asym"], "mlx", out)
    assert (result["bits"], result["group_size"], result["mapped_exactly"]) == (4, 32, 14)
    model, tok = load(str(out))
    layer = model.model.layers[0].mlp.down_proj
    w = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=32, bits=4)
    ours = _packed(artifacts["g32asym"])["model.layers.0.mlp.down_proj"].dequantize()
    assert np.allclose(np.array(w), ours.numpy(), atol=1e-6)
    assert isinstance(generate(model, tok, prompt="x = ", max_tokens=4), str)


def test_compressed_tensors_export_copies_and_dense_is_refused(artifacts: dict[str, Path],
                                                               tmp_path: Path) -> None:
    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    result = _export(artifacts["g64"], "compressed-tensors", tmp_path / "ct")
    assert result["compressed_tensors_format"] == "pack-quantized"
    assert json.loads((tmp_path / "ct/config.json").read_text())["quantization_config"]
    dense = save_model(tiny_llama(), tiny_tokenizer(), tmp_path / "dense")
    with pytest.raises(ConfigError, match="not quantized"):
        _export(dense, "compressed-tensors", tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()


def test_bad_requests_fail_cleanly(artifacts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "taken.gguf").write_text("x")
    with pytest.raises(UsageError, match="exists"):
        _export(artifacts["g64"], "gguf", tmp_path / "taken.gguf")
    with pytest.raises(UsageError, match="--format must be one of"):
        _export(artifacts["g64"], "onnx", tmp_path / "m.onnx")
    with pytest.raises(UsageError, match="--type must be one of"):
        _export(artifacts["g64"], "gguf", tmp_path / "m.gguf", "q3_k")
    with pytest.raises(ConfigError, match="needs one grid"):
        _export_per_channel_to_mlx(artifacts, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if ".db" not in p.name) == [
        "per-channel", "taken.gguf"]


def _export_per_channel_to_mlx(artifacts: dict[str, Path], tmp_path: Path) -> dict:
    from openpto.core.quant import RTNConfig
    from openpto.pipeline.quantize import quantize
    from openpto.pipeline.workflow import QuantizeOptions

    source = artifacts["g64"].parent / "tiny"
    quantize(str(source), RTNConfig(bits=8),
             QuantizeOptions(output=tmp_path / "per-channel"), store=Store(tmp_path / "q.db"))
    return _export(tmp_path / "per-channel", "mlx", tmp_path / "mlx")
