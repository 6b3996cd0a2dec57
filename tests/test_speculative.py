"""Speculative decoding: greedy identity per draft kind, cache roll-back, exact sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openpto.core.drafts import (
    LookupDraft,
    ModelDraft,
    check_same_tokenizer,
    early_exit_model,
)
from openpto.core.generate import generate_text
from openpto.core.kvcache import cache_length, crop_cache, forward_logits, new_cache
from openpto.core.sampling import SamplingParams
from openpto.core.speculative import (
    SpeculativeStats,
    best_gamma,
    speculative_generate,
    verify,
)
from openpto.errors import UsageError
from tests.helpers import one_thread, tiny_llama, tiny_tokenizer
from tests.test_generate import lively_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return"


@pytest.fixture(scope="module")
def target():  # type: ignore[no-untyped-def]
    return lively_llama(layers=3, seed=0)


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


def _drafts(target):  # type: ignore[no-untyped-def]
    return {
        "other-model": ModelDraft(lively_llama(layers=1, seed=5)),
        "same-model": ModelDraft(target),
        "self:layers=1": ModelDraft(early_exit_model(target, 1)),
        "self:layers=2": ModelDraft(early_exit_model(target, 2)),
        "lookup": LookupDraft(max_ngram=3),
    }


@pytest.mark.parametrize("kind", ["other-model", "same-model", "self:layers=1", "self:layers=2",
                                  "lookup"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_greedy_output_identical_to_target(target, tok, kind: str, adaptive: bool) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=40)
    reference = generate_text(target, tok, PROMPT, params, ignore_eos=True)
    draft = _drafts(target)[kind]
    result = speculative_generate(
        target, tok, draft, PROMPT, params, gamma=3, adaptive=adaptive, ignore_eos=True
    )
    assert result.generation.token_ids == reference.token_ids
    assert result.generation.text == reference.text
    stats = result.stats
    assert 0 <= stats.accepted <= stats.drafted == sum(stats.gammas)
    if kind == "same-model":
        assert stats.draft_acceptance_rate == 1.0


def test_stop_and_eos_inside_an_accepted_run(target, tok) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=30)
    reference = generate_text(target, tok, PROMPT, params, ignore_eos=True)
    eos = reference.token_ids[9]
    ref_eos = generate_text(target, tok, PROMPT, params, eos_token_ids=[eos])
    got = speculative_generate(
        target, tok, ModelDraft(target), PROMPT, params, gamma=6, eos_token_ids=[eos]
    )
    assert got.generation.token_ids == ref_eos.token_ids
    assert got.generation.finish_reason == "stop"


def test_early_exit_view_shares_weights_and_leaves_target_intact(target) -> None:  # type: ignore[no-untyped-def]
    view = early_exit_model(target, 1)
    assert len(view.model.layers) == 1 and len(target.model.layers) == 3
    assert target.config.num_hidden_layers == 3
    assert view.model.layers[0] is target.model.layers[0]
    assert view.lm_head.weight.data_ptr() == target.lm_head.weight.data_ptr()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        hidden = target.model.embed_tokens(ids)
        mask_free = target(ids, output_hidden_states=True).hidden_states[1]
        expected = target.lm_head(target.model.norm(mask_free))
        torch.testing.assert_close(view(ids).logits, expected)
        assert hidden.shape[-1] == 64
    with pytest.raises(UsageError, match="1 <= K < 3"):
        early_exit_model(target, 3)


def test_crop_cache_rolls_back_exactly(target) -> None:  # type: ignore[no-untyped-def]
    a, b, c = [3, 4, 5, 6], [7, 8, 9], [10, 11]
    cache = new_cache(target)
    forward_logits(target, torch.tensor([a + b]), cache)
    crop_cache(cache, len(a))
    assert cache_length(cache) == len(a)
    rolled = forward_logits(target, torch.tensor([c]), cache, keep=2)
    fresh = forward_logits(target, torch.tensor([a + c]), new_cache(target), keep=2)
    torch.testing.assert_close(rolled, fresh, rtol=1e-5, atol=1e-5)


def test_model_draft_rolls_back_its_cache(target) -> None:  # type: ignore[no-untyped-def]
    draft = ModelDraft(target)
    tokens = [3, 4, 5, 6, 7]
    proposals, q = draft.propose(tokens, 4, SamplingParams(), None, 512)
    assert len(proposals) == 4 and q is not None and q.shape == (4, 512)
    # It fed the committed tokens and three of its own proposals.
    assert cache_length(draft.cache) == len(tokens) + 3
    draft.rollback(len(tokens) + 1)
    assert cache_length(draft.cache) == len(tokens) + 1
    again, _ = draft.propose([*tokens, proposals[0], 99], 2, SamplingParams(), None, 512)
    reference = ModelDraft(target).propose([*tokens, proposals[0], 99], 2, SamplingParams(), None,
                                           512)[0]
    assert again == reference


def test_lookup_draft_proposes_continuation_of_latest_match() -> None:
    draft = LookupDraft(max_ngram=2)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3]
    proposals, q = draft.propose(tokens, 3, SamplingParams(), None, 16)
    assert proposals == [7, 8, 2] and q is None
    assert draft.propose([1, 2, 3], 3, SamplingParams(), None, 16) == ([], None)


def test_bad_options_are_usage_errors(target, tok) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="gamma"):
        speculative_generate(target, tok, LookupDraft(), PROMPT, gamma=0)
    with pytest.raises(UsageError, match="max_gamma"):
        speculative_generate(target, tok, LookupDraft(), PROMPT, gamma=4, max_gamma=2)
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(UsageError, match="vocabulary"):
        check_same_tokenizer(tok, other)
    check_same_tokenizer(tok, tiny_tokenizer())


def test_stats_use_vllm_definitions() -> None:
    stats = SpeculativeStats()
    stats.add(4, 4)
    stats.add(4, 1)
    stats.add(2, 0)
    assert stats.draft_acceptance_rate == pytest.approx(5 / 10)
    assert stats.mean_acceptance_length == pytest.approx(1 + 5 / 3)
    assert stats.acceptance_per_position == pytest.approx([2 / 3, 1 / 3, 1 / 2, 1 / 2])
    assert stats.per_token_acceptance == pytest.approx(5 / 7)
    assert best_gamma(0.9, 0.05, 8) > best_gamma(0.3, 0.05, 8) >= 1
    assert best_gamma(0.9, 2.0, 8) == 1


def test_verify_first_token_follows_target_distribution() -> None:
    """Draw d ~ q, run the acceptance rule: the emitted token must be distributed as p."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]])
    draws = 20000
    counts = torch.zeros(5)
    for _ in range(draws):
        d = int(torch.multinomial(q[0], 1, generator=gen))
        accepted, following = verify(p, [d], q, False, gen)
        counts[d if accepted else following] += 1
    tv = 0.5 * (counts / draws - p[0]).abs().sum()
    # TV of an exact sampler with 20000 draws over 5 outcomes is ~0.005; a biased rule
    # (e.g. always accepting) would be ~0.45 here.
    assert tv < 0.015
    assert counts[4] == 0


def test_speculative_sampling_matches_target_distribution() -> None:
    """End to end on a 4-token vocabulary: the joint law of generated tokens 2 and 3 (both from
    verification steps: acceptance, residual and bonus paths) against the exact target law,
    chi-square with a fixed seed."""
    vocab = 4
    target = tiny_llama(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, seed=1)
    draft_model = tiny_llama(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             seed=2)
    for model, scale in ((target, 0.6), (draft_model, 0.6)):
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0.0, scale)
    prompt = [0, 3, 1]
    params = SamplingParams(temperature=1.0, max_tokens=3)

    def probs(seq: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(target(torch.tensor([seq])).logits[0, -1].double(), dim=-1)

    exact = torch.zeros(vocab, vocab, dtype=torch.float64)
    p0 = probs(prompt)
    for t0 in range(vocab):
        p1 = probs([*prompt, t0])
        for t1 in range(vocab):
            exact[t1] += p0[t0] * p1[t1] * probs([*prompt, t0, t1])
    draws = 1200
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1234)
    draft = ModelDraft(draft_model)
    accepted = 0
    for _ in range(draws):
        result = speculative_generate(target, None, draft, prompt, params, gamma=2,
                                      adaptive=False, ignore_eos=True, generator=gen)
        _, t1, t2 = result.generation.token_ids
        counts[t1, t2] += 1
        accepted += result.stats.accepted
    expected = exact * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 15 degrees of freedom: P(chi2 > 37.7) = 0.001 for an exact sampler.
    assert chi2 < 37.7, chi2
    assert 0 < accepted < draws  # both the acceptance and the residual paths were exercised


@pytest.mark.parametrize("seed", [3, 4])
def test_seeded_speculative_sampling_is_reproducible(target, tok, seed: int) -> None:  # type: ignore[no-untyped-def]
    # A fixed gamma: adaptive gamma follows measured timings, which change how many draws a
    # step consumes (the law of the output stays exact, the exact tokens do not).
    params = SamplingParams(temperature=0.8, top_k=50, seed=seed, max_tokens=20)
    runs = [
        speculative_generate(target, tok, ModelDraft(early_exit_model(target, 1)), PROMPT, params,
                             adaptive=False, ignore_eos=True).generation.token_ids
        for _ in range(2)
    ]
    assert runs[0] == runs[1]



@pytest.mark.parametrize("spec", ["self:int4", "self:int8"])
def test_self_quantized_drafts_keep_greedy_identity(tok, spec: str) -> None:  # type: ignore[no-untyped-def]
    from openpto.models import LoadedModel
    from openpto.pipeline.generate import resolve_draft

    model = lively_llama(layers=2, seed=3)
    loaded = LoadedModel(model, tok, "tiny", "hf-folder", Path("."))
    draft, info = resolve_draft(spec, loaded)
    assert info["kind"] == "self-quantized"
    assert "dense-float32" not in info["kernels"]  # every Linear of the draft is packed
    assert isinstance(model.lm_head, torch.nn.Linear)  # the target is untouched
    params = SamplingParams(max_tokens=24)
    reference = generate_text(model, tok, PROMPT, params, ignore_eos=True)
    got = speculative_generate(model, tok, draft, PROMPT, params, ignore_eos=True)
    assert got.generation.token_ids == reference.token_ids
    assert got.stats.draft_acceptance_rate > 0.3  # a quantized copy mostly agrees


def test_resolve_draft_rejects_bad_specs(tok) -> None:  # type: ignore[no-untyped-def]
    from openpto.models import LoadedModel
    from openpto.pipeline.generate import resolve_draft

    loaded = LoadedModel(tiny_llama(), tok, "tiny", "hf-folder", Path("."))
    for spec, fragment in [("self:int3", "unknown self draft"), ("self:layers=x", "integer"),
                           ("self:layers=2", "1 <= K < 2"), ("lookup:0", "1 <= min")]:
        with pytest.raises(UsageError, match=fragment):
            resolve_draft(spec, loaded)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-target")
    lively_llama(layers=2, seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _opt(args: list[str]):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from openpto.cli.main import app

    return CliRunner().invoke(app, args)


def test_cli_speculative_json(tiny_folder: Path, tmp_db: Path) -> None:
    result = _opt(["speculative", str(tiny_folder), "--draft", "self:layers=1", "--prompt",
                   PROMPT, "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("text", "draft_acceptance_rate", "mean_acceptance_length",
                "acceptance_per_position", "tokens_per_second", "baseline_tokens_per_second",
                "speedup", "identical_to_target", "run_id"):
        assert key in data
    assert data["identical_to_target"] is True
    from openpto.store import Store

    store = Store()
    run = next(r for r in store.rows("runs") if r["id"] == data["run_id"])
    assert run["status"] == "succeeded" and run["kind"] == "speculative"
    names = {m["name"] for m in store.rows("metrics") if m["run_id"] == data["run_id"]}
    assert {"draft_acceptance_rate", "mean_acceptance_length", "speedup"} <= names


def test_cli_speculative_errors(tiny_folder: Path, tmp_db: Path, tmp_path: Path) -> None:
    result = _opt(["speculative", str(tiny_folder), "--draft", "lookup", "--gamma", "0",
                   "--prompt", "x", "--json"])
    assert isinstance(result.exception, UsageError) and "gamma" in str(result.exception)
    other = tmp_path / "other"
    tiny_llama().save_pretrained(other)
    odd = tiny_tokenizer()
    odd.add_tokens(["<extra>"])
    odd.save_pretrained(other)
    result = _opt(["speculative", str(tiny_folder), "--draft", str(other), "--prompt", "x",
                   "--json"])
    assert isinstance(result.exception, UsageError)
    assert "vocabulary" in str(result.exception)


DEFAULT_DRAFTS = ["lookup", "self:int4", "self:int8", "self:layers=10"]


@pytest.mark.integration
def test_default_model_128_tokens_identical_for_every_draft() -> None:
    from openpto.core.generate import encode_prompt
    from openpto.models import load_model
    from openpto.pipeline.generate import resolve_draft

    target = load_model(None, dtype="float32", device="cpu")
    text = ("Repeat this sentence twice, exactly: the quick brown fox jumps over the lazy dog "
            "while the cat sleeps on the warm windowsill.")
    ids = encode_prompt(target.tokenizer, text, chat=True)
    params = SamplingParams(max_tokens=128)
    reference = generate_text(target.model, target.tokenizer, ids, params, ignore_eos=True)
    assert len(reference.token_ids) == 128
    for spec in DEFAULT_DRAFTS:
        draft, _ = resolve_draft(spec, target)
        got = speculative_generate(target.model, target.tokenizer, draft, ids, params,
                                   ignore_eos=True)
        assert got.generation.token_ids == reference.token_ids, spec
        assert got.generation.text == reference.text, spec
