"""Every supported architecture on a tiny random config: its adapter against the real modules,
RTN/GPTQ/AWQ (codes on the grid, logit error bounds, the AWQ fold exact), Wanda/SparseGPT
(measured sparsity, N:M), and through the CLI the artifact round trip, greedy generation and GGUF
export read back with gguf's reader."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from openpto.api import quantize_, sparsify_
from openpto.architectures import architecture, supported_model_types
from openpto.core.calibrate import decoder_layers, find_linears
from openpto.core.quant import AWQConfig, GPTQConfig, RTNConfig
from openpto.core.quant.awq import channel_maps, fold_scale
from openpto.core.sparsity import SparseGPTConfig, WandaConfig
from openpto.errors import ConfigError, UnsupportedModel
from tests.helpers import one_thread, tiny_tokenizer

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
#: llama.cpp's name for each, as the gguf package spells it
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
#: GGUF tensors of block 0 each architecture must hold (beyond attn_norm, attn_output, ffn_down)
GGUF_BLOCK = {
    "llama": {"attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up", "ffn_norm"},
    "qwen2": {"attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up", "ffn_norm"},
    "qwen3": {"attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "ffn_gate", "ffn_up",
              "ffn_norm"},
    "gemma2": {"attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up", "ffn_norm",
               "post_attention_norm", "post_ffw_norm"},
    "gemma3": {"attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "ffn_gate", "ffn_up",
               "ffn_norm", "post_attention_norm", "post_ffw_norm"},
    "phi3": {"attn_qkv", "ffn_up", "ffn_norm"},
}
#: architecture keys beyond the common ones, as the tiny configs set them
GGUF_KEYS = {
    "gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "attention.sliding_window": 4096},
    "gemma3": {"rope.freq_base": 1e6, "attention.sliding_window": 4096},  # the global base
    "phi3": {"rope.scaling.original_context_length": 4096, "attention.sliding_window": 0},
}
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


def tiny_model(model_type: str, seed: int = 0) -> Any:
    """A random 2-layer model of ``model_type`` (hidden 64, 4 heads of 16, 2 KV heads, vocab
    512) whose norm weights are random too, so that a fold that gets a norm wrong shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    offset = architecture(model_type).norm_offset
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # effective scales around 1 in every convention
                param.copy_(1 - offset + 0.3 * torch.randn(param.shape, generator=g))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module", params=MODEL_TYPES)
def model_type(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def model(model_type: str) -> Any:
    return tiny_model(model_type)


def _ids(seed: int, rows: int = 2, cols: int = 32) -> torch.Tensor:
    return torch.randint(3, 512, (rows, cols), generator=torch.Generator().manual_seed(seed))


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# The adapter against the modules


def test_input_groups_are_the_linears_that_read_one_tensor(model_type: str, model: Any) -> None:
    arch = architecture(model_type)
    _, layers = decoder_layers(model)
    calls: list[tuple[str, torch.Tensor]] = []
    linears = find_linears(layers[0])
    handles = [lin.register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0])))
               for n, lin in linears.items()]
    try:
        _logits(model, _ids(0))
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for index, (name, x) in enumerate(calls):
        if index and x is calls[index - 1][1]:
            groups[-1].append(name)
        else:
            groups.append([name])
    assert [tuple(g) for g in groups] == list(arch.input_groups)
    assert {n for g in arch.input_groups for n in g} == set(linears)


def test_awq_fold_leaves_the_float_function_unchanged(model_type: str, model: Any) -> None:
    """Random scales folded into every pair (norm -> Linears, v -> o, up -> down, fused rows
    included) change the logits by less than 1e-5 relative; for Gemma's ``(1 + w)`` norms a fold
    that ignores the offset is far off, so the check would catch it."""
    ids = _ids(1)
    reference = _logits(model, ids)

    def fold_all(norm_offset: float) -> Any:
        folded = copy.deepcopy(model)
        arch = architecture(model_type)
        g = torch.Generator().manual_seed(2)
        count = 0
        for layer in decoder_layers(folded)[1]:
            linears = find_linears(layer)
            for pair in arch.scale_pairs:
                prev = layer.get_submodule(pair.prev)
                rows = (arch.rows(folded.config, pair.prev, pair.prev_part) if pair.prev_part
                        else slice(None))
                channels = len(range(prev.weight.shape[0])[rows])
                members = [linears[n] for n in pair.linears]
                maps = channel_maps(layer, pair, channels, members[0].in_features)
                assert maps is not None, pair
                s = torch.rand(channels, generator=g) * 4 + 0.25
                fold_scale(prev, members, s, maps[0], rows, norm_offset)
                count += 1
        assert count == 4 * 2
        return folded

    offset = architecture(model_type).norm_offset
    assert _relative(_logits(fold_all(offset), ids), reference) < 1e-5
    if offset:
        assert _relative(_logits(fold_all(0.0), ids), reference) > 1e-2


def test_unknown_model_type_names_the_supported_ones() -> None:
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    supported = ", ".join(sorted(MODEL_TYPES))
    assert supported_model_types() == tuple(sorted(MODEL_TYPES))
    with pytest.raises(UnsupportedModel) as info:
        quantize_(model, RTNConfig(bits=4, group_size=32))
    assert str(info.value) == (f"no architecture adapter for model type 'mystery' "
                               f"(supported: {supported})")
    with pytest.raises(UnsupportedModel, match="supported: gemma2, "):
        architecture(None)


# ---------------------------------------------------------------------------------------------
# Transforms


#: relative logit error allowed after 4-bit g32 quantization (RTN, GPTQ or AWQ, calibrated on
#: 4 x 32 random tokens) of the tiny random models; measured 0.054-0.138 for the Llama-like ones
#: and phi3, 0.197-0.227 for Gemma 2 and 3 (seeds as below, 2026-12-07)
QUANT_BOUND = {"gemma2": 0.25, "gemma3_text": 0.25}
DEFAULT_BOUND = 0.15


@pytest.mark.parametrize("config", [
    RTNConfig(bits=4, group_size=32, symmetric=False),
    GPTQConfig(bits=4, group_size=32, symmetric=False),
    AWQConfig(bits=4, group_size=32),
], ids=["rtn", "gptq", "awq"])
def test_quantize_puts_every_linear_on_its_grid(model_type: str, model: Any, config: Any) -> None:
    quantized = copy.deepcopy(model)
    result = quantize_(quantized, config, _ids(3, rows=4))
    names = {f"{prefix}.{i}.{n}" for prefix, layers in [decoder_layers(quantized)]
             for i, layer in enumerate(layers) for n in find_linears(layer)}
    weights = result.quantized_weights()
    assert set(weights) == names
    for name, qw in weights.items():
        assert qw.bits == 4 and int(qw.q.max()) <= 15  # codes in [0, 15] (uint8)
        assert torch.equal(quantized.get_submodule(name).weight.data, qw.dequantize())
    ids = _ids(4)
    error = _relative(_logits(quantized, ids), _logits(model, ids))
    assert 0 < error < QUANT_BOUND.get(model_type, DEFAULT_BOUND), error


@pytest.mark.parametrize("config", [WandaConfig(sparsity=0.5), SparseGPTConfig(pattern="2:4")],
                         ids=["wanda-50", "sparsegpt-2:4"])
def test_sparsify_meets_the_target_exactly(model: Any, config: Any) -> None:
    pruned = copy.deepcopy(model)
    result = sparsify_(pruned, config, _ids(5, rows=4))
    assert len(result.masks()) == sum(len(find_linears(la)) for la in decoder_layers(pruned)[1])
    for name in result.masks():
        w = pruned.get_submodule(name).weight.data
        assert float((w == 0).float().mean()) == 0.5, name
        if config.nm is not None:
            zeros = (w.view(w.shape[0], -1, 4) == 0).sum(-1)
            assert bool((zeros >= 2).all()), name


# ---------------------------------------------------------------------------------------------
# The CLI end to end: artifacts, generation, GGUF


def _opt(args: list[str]) -> dict[str, Any]:
    from typer.testing import CliRunner

    from openpto.cli.main import app

    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


@pytest.fixture(scope="module")
def built(model_type: str, model: Any, tmp_path_factory: pytest.TempPathFactory,
          ) -> dict[str, Any]:
    """The float folder and, written through ``opt``, its RTN and AWQ (4-bit g32 asymmetric) and
    Wanda artifacts (GPTQ runs in memory above: each CLI call costs seconds here)."""
    import os

    root = tmp_path_factory.mktemp(model_type)
    os.environ["OPT_DB"] = str(root / "opt.db")
    folder = root / "float"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    # A few pages of Python's docs: tokenizing all of them (the default) costs more than the rest.
    from pydoc_data.topics import topics

    text = root / "calib.txt"
    text.write_text("\n".join(topics[k] for k in sorted(topics))[:20_000])
    calib = ["--calib", str(text), "--samples", "4", "--calib-seq-len", "32"]
    out: dict[str, Any] = {"folder": folder}
    for method in ("rtn", "awq"):
        out[method] = _opt(["quantize", str(folder), "--method", method, "--bits", "4",
                            "--group-size", "32", "--asym", *calib,
                            "--output", str(root / method)])
    out["wanda"] = _opt(["sparsify", str(folder), "--method", "wanda", "--sparsity", "0.5",
                         *calib, "--output", str(root / "wanda")])
    return out


def _load(path: str) -> Any:
    from openpto.models import load_model

    return load_model(path)


def _with_stored_tensors(reference: Any, reloaded: Any, quantized: set[str]) -> Any:
    """``reference`` with every tensor that is not a quantized weight taken from ``reloaded``,
    after checking it is the reference's own value (as stored: float32, or rounded to 16 bits)."""
    reloaded_state = reloaded.state_dict()
    with torch.no_grad():
        for name, param in reference.state_dict().items():
            if name.removesuffix(".weight") in quantized or name not in reloaded_state:
                continue
            stored = reloaded_state[name].to(param.dtype)
            assert any(torch.equal(stored, param.to(dt).to(param.dtype))
                       for dt in (torch.float32, torch.bfloat16, torch.float16)), name
            param.copy_(stored)
    return reference


def _greedy(model: Any, ids: list[int], steps: int, eos: int) -> list[int]:
    out: list[int] = []
    tokens = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            token = int(model(torch.tensor([tokens])).logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        tokens.append(token)
    return out


def test_rtn_artifact_round_trip_and_generation(model_type: str, model: Any,
                                                built: dict[str, Any]) -> None:
    artifact = built["rtn"]["output"]
    reloaded = _load(artifact)
    assert reloaded.model.config.model_type == model_type
    from openpto.core.quant.tensor import QuantizedWeight
    from openpto.kernels import swap_to_packed
    from openpto.models.artifact_loaders import read_packed_weights

    # The same quantization in memory; the artifact holds its codes and zeros exactly and its
    # scales in float16. Run as stored, on the kernel the loader picked for the artifact.
    reference = copy.deepcopy(model)
    result = quantize_(reference, RTNConfig(bits=4, group_size=32, symmetric=False))
    packed = read_packed_weights(Path(artifact), None)
    stored = {}
    for name, qw in result.quantized_weights().items():
        scale = qw.scale.to(torch.float16).float()
        assert torch.equal(packed[name].q, qw.q) and torch.equal(packed[name].zero, qw.zero)
        assert torch.equal(packed[name].scale.float(), scale), name
        stored[name] = QuantizedWeight(qw.q, scale, qw.zero, qw.bits, qw.group_size, False)
    reference = _with_stored_tensors(reference, reloaded.model, set(stored))
    swap_to_packed(reference, stored, str(reloaded.metadata["kernel"]))
    ids = _ids(6)
    assert torch.equal(_logits(reloaded.model, ids), _logits(reference, ids))
    tok = reloaded.tokenizer  # the artifact's own (the in-memory one can split text otherwise)
    data = _opt(["generate", artifact, "--prompt", PROMPT, "--max-new-tokens", "8", "--raw",
                 "--no-stream"])
    expected = _greedy(reference, tok(PROMPT)["input_ids"], 8, int(tok.eos_token_id))
    assert data["tokens"] == len(expected)
    # Random models emit byte tokens that never complete a UTF-8 character; the CLI holds
    # those back where decode() writes replacement characters.
    assert data["text"] == tok.decode(expected).rstrip("\ufffd")


def test_awq_artifact_reloads_close_to_the_float_model(model_type: str, model: Any,
                                                      built: dict[str, Any]) -> None:
    """The AWQ artifact holds scaled norms (Gemma's folded into ``1 + w``) and still computes
    what the float model does, within the quantization bound."""
    from openpto.models.artifact_loaders import read_packed_weights

    artifact = Path(built["awq"]["output"])
    reloaded = _load(str(artifact)).model
    packed = read_packed_weights(artifact, None)
    assert len(packed) == 2 * len(find_linears(decoder_layers(model)[1][0]))
    ids = _ids(7)
    error = _relative(_logits(reloaded, ids), _logits(model, ids))
    assert 0 < error < QUANT_BOUND.get(model_type, DEFAULT_BOUND), error
    norms = {p.prev for p in architecture(model_type).scale_pairs if p.prev.endswith("norm")}
    changed = [
        f"{i}.{n}" for i, (ours, theirs) in enumerate(zip(decoder_layers(reloaded)[1],
                                                          decoder_layers(model)[1], strict=True))
        for n in norms
        if not torch.allclose(ours.get_submodule(n).weight.float(),
                              theirs.get_submodule(n).weight, atol=1e-3)
    ]
    assert changed  # AWQ scaled at least one norm -> Linears pair


def test_wanda_artifact_keeps_its_sparsity(model_type: str, built: dict[str, Any]) -> None:
    assert built["wanda"]["sparsity"] == 0.5
    reloaded = _load(built["wanda"]["output"]).model
    for layer in decoder_layers(reloaded)[1]:
        for name, linear in find_linears(layer).items():
            assert float((linear.weight == 0).float().mean()) == 0.5, name


def test_gguf_export_reads_back(model_type: str, model: Any, built: dict[str, Any],
                                tmp_path: Path) -> None:
    import gguf

    from openpto.models.artifact_loaders import read_packed_weights
    from openpto.pipeline.export import _permutation

    artifact = Path(built["rtn"]["output"])
    out = tmp_path / "m.gguf"
    data = _opt(["export", str(artifact), "--format", "gguf", "--output", str(out)])
    assert data["type"] == "q4_1" and data["requantized"] == 0
    reader = gguf.GGUFReader(out)
    arch = GGUF_ARCH[model_type]
    fields = reader.fields
    assert fields["general.architecture"].contents() == arch
    assert fields[f"{arch}.block_count"].contents() == 2
    assert fields[f"{arch}.attention.head_count_kv"].contents() == 2
    assert fields[f"{arch}.attention.key_length"].contents() == 16
    for key, value in GGUF_KEYS.get(arch, {}).items():
        assert fields[f"{arch}.{key}"].contents() == value, key
    assert ("output.weight" in {t.name for t in reader.tensors}) == (
        not model.config.tie_word_embeddings)
    tensors = {t.name: t for t in reader.tensors}
    block = {n.split(".")[2] for n in tensors if n.startswith("blk.0.")}
    assert block == GGUF_BLOCK[arch] | {"attn_norm", "attn_output", "ffn_down"}
    assert "token_embd.weight" in tensors and "output_norm.weight" in tensors
    # Every quantized Linear maps onto Q4_1 blocks holding exactly our dequantized weights.
    packed = read_packed_weights(artifact, None)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    permute = architecture(model_type).gguf.permute_qk  # type: ignore[union-attr]
    for module, qw in packed.items():
        index, local = module.split(".")[2], ".".join(module.split(".")[3:])
        t = tensors[f"blk.{index}.{names[local]}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
        ours = qw.dequantize()
        if permute and local in ("self_attn.q_proj", "self_attn.k_proj"):
            ours = ours[_permutation(ours.shape[0], 4 if local.endswith("q_proj") else 2)]
        assert tuple(int(d) for d in reversed(t.shape)) == tuple(ours.shape)
        # Q4_1 holds d and m in float16, each within 2^-11 relative: codes up to 15 times d's
        # error plus m's (at most 15 scales) bound the difference.
        atol = 32 * 2.0**-11 * float(qw.scale.abs().max())
        np.testing.assert_allclose(gguf.quants.dequantize(t.data, t.tensor_type), ours.numpy(),
                                   rtol=0, atol=atol)
    # Norms are float32; Gemma's are stored as 1 + w, the factor llama.cpp multiplies by.
    offset = architecture(model_type).norm_offset
    norm = tensors["blk.1.attn_norm.weight"]
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    source = model.model.layers[1].input_layernorm.weight.detach()
    stored = _load(str(artifact)).model.model.layers[1].input_layernorm.weight.detach().float()
    np.testing.assert_array_equal(np.asarray(norm.data), (stored + offset).numpy())
    torch.testing.assert_close(stored, source, rtol=1e-2, atol=1e-2)


def test_gguf_export_refuses_an_architecture_without_adapter(built: dict[str, Any],
                                                             tmp_path: Path) -> None:
    import shutil

    from openpto.pipeline.export import write_gguf

    folder = tmp_path / "mystery"
    shutil.copytree(built["rtn"]["output"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mystery"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="no architecture adapter for model type 'mystery'"):
        write_gguf(folder, tmp_path / "m.gguf", None, lambda message: None)
    assert not (tmp_path / "m.gguf").exists()
