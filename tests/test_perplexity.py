from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openpto.core.metrics import perplexity, plan_windows
from openpto.errors import DataError, UsageError
from tests.helpers import tiny_llama


@settings(max_examples=300, deadline=None)
@given(
    n_tokens=st.integers(0, 20_000),
    seq_len=st.integers(2, 2048),
    max_tokens=st.one_of(st.none(), st.integers(1, 20_000)),
)
def test_window_plan_scores_every_token_once(
    n_tokens: int, seq_len: int, max_tokens: int | None
) -> None:
    used = n_tokens if max_tokens is None else min(n_tokens, max_tokens)
    if n_tokens == 0 or used < seq_len:
        with pytest.raises(DataError):
            plan_windows(n_tokens, seq_len, max_tokens)
        return
    plan = plan_windows(n_tokens, seq_len, max_tokens)
    assert plan.windows == used // seq_len
    assert plan.tokens + plan.dropped_tokens == used and plan.dropped_tokens < seq_len
    fed = [t for start, end in plan.spans() for t in range(start, end)]
    assert fed == list(range(plan.tokens))  # contiguous, in order, no token fed twice
    # Scored: every token of a window but its first, each exactly once.
    scored = [t for start, end in plan.spans() for t in range(start + 1, end)]
    assert len(scored) == len(set(scored)) == plan.scored_tokens == plan.windows * (seq_len - 1)
    assert set(fed) - set(scored) == {start for start, _ in plan.spans()}


def test_bad_options() -> None:
    model = tiny_llama()
    ids = torch.arange(100) % 512
    with pytest.raises(UsageError, match="--seq-len must be at least 2"):
        perplexity(model, ids, seq_len=1)
    with pytest.raises(DataError, match="empty"):
        perplexity(model, torch.zeros(0, dtype=torch.long), seq_len=16)
    with pytest.raises(DataError, match="fewer than one window of 128"):
        perplexity(model, ids, seq_len=128)
    with pytest.raises(DataError, match="fewer than one window"):
        perplexity(model, ids, seq_len=16, max_tokens=10)
    with pytest.raises(UsageError, match="--batch-size"):
        perplexity(model, ids, seq_len=16, batch_size=0)


def _reference_perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int) -> float:
    """Written apart from the library: float64 model, one window at a time, explicit sums."""
    model64 = tiny_llama(dtype=torch.float64)
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    total, count = 0.0, 0
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        window = ids[start : start + seq_len].unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(model64(window).logits[0].double(), dim=-1)
        for pos in range(1, seq_len):
            total -= float(logp[pos - 1, window[0, pos]])
            count += 1
    return math.exp(total / count)


def test_matches_float64_reference(tiny_tok) -> None:  # type: ignore[no-untyped-def]
    from openpto.data import load_text, tokenize_text

    model = tiny_llama(seed=1)
    ids = tokenize_text(tiny_tok, load_text("stdlib-docstrings").text[:20_000])[:1000]
    seq_len = 96  # 10 windows, 40 tokens dropped
    expected = _reference_perplexity(model, ids, seq_len)
    calls: list[int] = []
    result = perplexity(model, ids, seq_len, batch_size=3, progress=calls.append)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.plan.windows == 10 and result.scored_tokens == 10 * 95
    assert result.plan.dropped_tokens == 40 and calls == [3, 3, 3, 1]
    # A random model is near-uniform over its 512-token vocabulary.
    assert 300 < result.perplexity < 900
    # Batch size changes nothing but speed.
    assert perplexity(model, ids, seq_len, batch_size=1).perplexity == pytest.approx(
        result.perplexity, rel=1e-6
    )
    # max_tokens is the same as cutting the ids first.
    cut = perplexity(model, ids, seq_len, max_tokens=500)
    assert cut.plan.windows == 5 and cut.plan.available_tokens == 1000
    expected_cut = _reference_perplexity(model, ids[:500], seq_len)
    assert cut.perplexity == pytest.approx(expected_cut, rel=1e-5)


def test_low_precision_model_still_scores_in_float32(tiny_tok) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 512, (512,), generator=torch.Generator().manual_seed(0))
    fp32 = perplexity(model, ids, 128).perplexity
    bf16 = perplexity(model.to(torch.bfloat16), ids, 128).perplexity
    assert math.isfinite(bf16) and bf16 == pytest.approx(fp32, rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model = tiny_llama(seed=3)
    ids = torch.randint(0, 512, (1024,), generator=torch.Generator().manual_seed(1))
    cpu = perplexity(model, ids, 256, batch_size=2).perplexity
    gpu = perplexity(model.cuda(), ids, 256, batch_size=2).perplexity
    assert gpu == pytest.approx(cpu, rel=1e-4)
