"""Static-cache decoding (core.static_decode) against the dynamic-cache path, on tiny models."""

from __future__ import annotations

import pytest
import torch

from openpto.core.generate import generate_stream, generate_text
from openpto.core.quant.tensor import quantize_weight
from openpto.core.sampling import SamplingParams
from openpto.core.static_decode import (
    CAPACITY_STEP,
    DynamicDecoder,
    StaticDecoder,
    open_decoder,
    release_static_decoders,
)
from openpto.errors import UsageError
from tests.helpers import one_thread, tiny_llama, tiny_tokenizer
from tests.test_generate import PROMPTS, lively_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield
    release_static_decoders()


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return lively_llama()


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


def both(model, tok, prompt, params, **kwargs):  # type: ignore[no-untyped-def]
    dynamic = generate_text(model, tok, prompt, params, decode="dynamic", **kwargs)
    static = generate_text(model, tok, prompt, params, decode="static", **kwargs)
    return dynamic, static


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_the_dynamic_cache(model, tok, prompt) -> None:  # type: ignore[no-untyped-def]
    dynamic, static = both(model, tok, prompt, SamplingParams(max_tokens=48), ignore_eos=True)
    assert len(dynamic.token_ids) == 48
    assert static.token_ids == dynamic.token_ids
    assert static.text == dynamic.text


def test_greedy_tokens_match_on_the_default_tiny_llama(tok) -> None:  # type: ignore[no-untyped-def]
    plain = tiny_llama(num_hidden_layers=3, seed=1)
    dynamic, static = both(plain, tok, PROMPTS[1], SamplingParams(max_tokens=40), ignore_eos=True)
    assert static.token_ids == dynamic.token_ids


def test_seeded_sampling_with_every_filter_matches(model, tok) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02,
                            repetition_penalty=1.3, seed=7, max_tokens=48)
    dynamic, static = both(model, tok, PROMPTS[0], params, ignore_eos=True)
    assert len(set(dynamic.token_ids)) > 5  # really sampled, not stuck on one token
    assert static.token_ids == dynamic.token_ids


def test_stop_strings_and_eos_end_both_paths_alike(model, tok) -> None:  # type: ignore[no-untyped-def]
    greedy = generate_text(model, tok, PROMPTS[0], SamplingParams(max_tokens=30), ignore_eos=True)
    stop = greedy.text[8:12]
    params = SamplingParams(max_tokens=30, stop=(stop,))
    dynamic, static = both(model, tok, PROMPTS[0], params)
    assert dynamic.finish_reason == static.finish_reason == "stop"
    assert static.text == dynamic.text and stop not in static.text
    eos = greedy.token_ids[5]
    dynamic, static = both(model, tok, PROMPTS[0], SamplingParams(max_tokens=30),
                           eos_token_ids=[eos])
    assert static.token_ids == dynamic.token_ids
    assert static.token_ids[-1] == eos and static.finish_reason == "stop"


def test_step_logits_match_the_dynamic_cache(model) -> None:  # type: ignore[no-untyped-def]
    ids = torch.tensor([[5, 9, 100, 41, 7, 300]])
    with torch.inference_mode():
        dynamic = DynamicDecoder(model)
        static = StaticDecoder(model, CAPACITY_STEP, "static")
        pairs = [(dynamic.prefill(ids), static.prefill(ids).clone())]
        for token in (11, 200, 3):
            step = torch.tensor([[token]])
            pairs.append((dynamic.step(step), static.step(step).clone()))
    for reference, got in pairs:
        assert got.shape == reference.shape == (1, 512)
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_step_needs_no_host_reads() -> None:
    # A CUDA graph cannot contain a device-to-host read; on the meta device every such read
    # (.item(), bool(tensor), a data-dependent shape) raises, so this runs the step as captured.
    meta = tiny_llama().to("meta")
    with torch.inference_mode():
        decoder = StaticDecoder(meta, CAPACITY_STEP, "static")
        decoder.prefill(torch.zeros((1, 7), dtype=torch.long, device="meta"))
        for _ in range(2):
            logits = decoder.step(torch.zeros((1, 1), dtype=torch.long, device="meta"))
    assert logits.shape == (1, 512) and logits.dtype == torch.float32


def test_decoders_are_reused_until_the_weights_change(tok) -> None:  # type: ignore[no-untyped-def]
    model = lively_llama(seed=3)
    first = open_decoder(model, 40, "static")
    first.close()
    assert open_decoder(model, CAPACITY_STEP, "static") is first  # fits: same cache
    first.close()
    busy = open_decoder(model, 40, "static")
    assert open_decoder(model, 40, "static") is not busy  # a running request keeps its own
    busy.close()
    bigger = open_decoder(model, CAPACITY_STEP + 1, "static")
    assert isinstance(bigger, StaticDecoder) and bigger.capacity == 2 * CAPACITY_STEP
    bigger.close()
    reference = generate_text(model, tok, PROMPTS[1], SamplingParams(max_tokens=20),
                              decode="dynamic", ignore_eos=True)
    for _ in range(2):  # a reused cache starts clean
        again = generate_text(model, tok, PROMPTS[1], SamplingParams(max_tokens=20),
                              decode="static", ignore_eos=True)
        assert again.token_ids == reference.token_ids
    stream = generate_stream(model, tok, PROMPTS[0], decode="static")
    next(stream)
    stream.close()  # a stream stopped early releases its decoder
    assert open_decoder(model, 40, "static") is bigger
    bigger.close()
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
    assert open_decoder(model, 40, "static") is not bigger


def test_packed_int4_layers_decode_alike(tok) -> None:  # type: ignore[no-untyped-def]
    from openpto.kernels import model_kernel_summary, swap_to_packed

    model = lively_llama(seed=5)
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers")}
    quantized = {name: quantize_weight(m.weight.data, 4, 32, False) for name, m in linears.items()}
    summary = swap_to_packed(model, quantized)
    assert summary == model_kernel_summary(model) == {"dense": 1, "packed-int4-cpu": 14}
    dynamic, static = both(model, tok, PROMPTS[2], SamplingParams(max_tokens=32), ignore_eos=True)
    assert static.token_ids == dynamic.token_ids


def test_mode_selection_on_cpu(model) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(open_decoder(model, 40, "auto"), DynamicDecoder)
    assert isinstance(open_decoder(model, 40, "graph"), DynamicDecoder)  # no CUDA: eager
    static = open_decoder(model, 40, "static")
    assert isinstance(static, StaticDecoder) and static.mode == "static"
    static.close()
    with pytest.raises(UsageError, match="decode mode"):
        open_decoder(model, 40, "fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager_static_decode(tok) -> None:  # type: ignore[no-untyped-def]
    model = lively_llama().cuda()
    params = SamplingParams(max_tokens=40)
    static = generate_text(model, tok, PROMPTS[1], params, decode="static", ignore_eos=True)
    graph = generate_text(model, tok, PROMPTS[1], params, decode="graph", ignore_eos=True)
    decoder = open_decoder(model, 40, "graph")
    assert isinstance(decoder, StaticDecoder) and decoder.graph is not None
    decoder.close()
    assert graph.token_ids == static.token_ids
    again = generate_text(model, tok, PROMPTS[0], params, decode="graph", ignore_eos=True)
    dynamic = generate_text(model, tok, PROMPTS[0], params, decode="dynamic", ignore_eos=True)
    assert again.token_ids == dynamic.token_ids


def test_a_full_static_cache_moves_to_a_larger_one(model, tok, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import openpto.core.generate as generate_module

    # Small steps so that the request outgrows its first cache.
    monkeypatch.setattr("openpto.core.static_decode.CAPACITY_STEP", 16)
    monkeypatch.setattr(generate_module, "FIRST_ROOM", 8)
    opened: list[int] = []

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        decoder = open_decoder(*args, **kwargs)
        if isinstance(decoder, StaticDecoder):
            opened.append(decoder.capacity)
        return decoder

    monkeypatch.setattr(generate_module, "open_decoder", spy)
    release_static_decoders()
    prompt = tok(PROMPTS[1])["input_ids"]
    params = SamplingParams(max_tokens=60)
    dynamic, static = both(model, tok, prompt, params, ignore_eos=True)
    assert static.token_ids == dynamic.token_ids and len(static.token_ids) == 60
    # prompt + 8 rounded up to 16s, then twice that, capped by prompt + 60 (rounded up).
    first = -(-(len(prompt) + 8) // 16) * 16
    assert opened == [first, min(2 * first, -(-(len(prompt) + 60) // 16) * 16)]
    # A short request does not reuse a cache more than twice the size it needs.
    short = open_decoder(model, 20, "static")
    assert isinstance(short, StaticDecoder) and short.capacity == 32
    short.close()
    release_static_decoders()
