"""Every sampling option on hand-made logits, checked against the math."""

from __future__ import annotations

import math

import pytest
import torch

from openpto.core.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    make_generator,
    probabilities,
    sample_next,
)
from openpto.errors import UsageError


def _kept(row: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(row.tolist()) if v != -math.inf}


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.2}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_params_are_usage_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        SamplingParams(**kwargs)


def test_single_stop_string_is_not_split_into_characters() -> None:
    assert SamplingParams(stop="END").stop == ("END",)  # type: ignore[arg-type]


def test_top_k_keeps_exactly_k_even_with_ties() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_k=3))
    kept = _kept(out[0])
    assert len(kept) == 3
    assert 0 in kept and kept <= {0, 2, 3, 4}
    assert len(_kept(filter_logits(logits, SamplingParams(temperature=1.0, top_k=1))[0])) == 1


def test_top_p_keeps_smallest_set_reaching_the_mass() -> None:
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    # 0.5 < 0.6 so the second token is needed; 0.5 + 0.2 = 0.7 >= 0.6 so the third is not.
    assert _kept(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.6))[0]) == {0, 1}
    assert _kept(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.5))[0]) == {0}
    assert _kept(filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.86))[0]) == {
        0, 1, 2, 3,
    }
    # A tiny top_p still keeps the most likely token.
    assert _kept(filter_logits(logits, SamplingParams(temperature=1.0, top_p=1e-6))[0]) == {0}
    renorm = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.6))[0]
    torch.testing.assert_close(renorm[:2], torch.tensor([0.5, 0.2]) / 0.7)


def test_min_p_removes_tokens_below_fraction_of_top() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.19, 0.11]])
    out = filter_logits(probs.log(), SamplingParams(temperature=1.0, min_p=0.5))
    # threshold = 0.5 * 0.4 = 0.2
    assert _kept(out[0]) == {0, 1}


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    out = filter_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(out, logits / 0.5)
    p = probabilities(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(p, torch.softmax(logits / 2.0, dim=-1))


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-38, 1e-5])
def test_a_vanishing_temperature_samples_the_argmax_instead_of_nan(temperature: float) -> None:
    """Found by fuzzing opt serve: logits / 1e-300 overflowed to inf and softmax to nan."""
    logits = torch.tensor([[2.0, 7.5, -1.0, 7.0], [-3.0, -2.0, -2.5, float("-inf")]])
    params = SamplingParams(temperature=temperature, seed=0)
    p = probabilities(logits, params)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    assert sample_next(logits, params, make_generator(params)).tolist() == [1, 1]


@pytest.mark.parametrize("penalty", [5e-324, 1e-300, 1e-39, 1e300])
def test_an_extreme_repetition_penalty_keeps_the_distribution_finite(penalty: float) -> None:
    """Found by fuzzing opt serve: repetition_penalty=5e-324 made logits / penalty inf."""
    logits = torch.tensor([[2.0, 7.5, -1.0, float("-inf")], [3.0, 1.0, 0.0, -2.0]])
    previous = torch.tensor([[0, 2, 3], [1, 3, 3]])
    params = SamplingParams(temperature=1.0, repetition_penalty=penalty, seed=0)
    out = apply_repetition_penalty(logits, previous, penalty)
    assert not torch.isnan(out).any() and torch.isneginf(out[0, 3])
    p = probabilities(logits, params)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(dim=-1), torch.ones(2))
    sample_next(logits, params, make_generator(params), previous=previous)


def test_repetition_penalty_math() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0], [2.0, -2.0, 1.0, -1.0]])
    previous = torch.tensor([[0, 1, 1], [2, 3, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # row 1's token 2 is padding
    out = apply_repetition_penalty(logits, previous, 2.0, mask)
    expected = torch.tensor([[1.0, -4.0, 1.0, -1.0], [1.0, -2.0, 1.0, -2.0]])
    torch.testing.assert_close(out, expected)
    assert apply_repetition_penalty(logits, previous, 1.0) is logits


def test_greedy_is_argmax_and_repetition_penalty_changes_it() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.5]])
    greedy = SamplingParams()
    assert sample_next(logits, greedy).tolist() == [1]
    penalised = SamplingParams(repetition_penalty=1.5)
    assert sample_next(logits, penalised, previous=torch.tensor([[1]])).tolist() == [2]


def test_seed_determinism_and_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(4000, 1)
    params = SamplingParams(temperature=1.0, seed=7)
    a = sample_next(logits, params, make_generator(params))
    b = sample_next(logits, params, make_generator(params))
    assert torch.equal(a, b)
    other = sample_next(logits, params.replace(seed=8), make_generator(params.replace(seed=8)))
    assert not torch.equal(a, other)
    freq = torch.bincount(a, minlength=4).float() / len(a)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0, -1.0]), dim=-1)
    # 4000 draws: each frequency within 4 standard deviations of its probability
    sd = (expected * (1 - expected) / len(a)).sqrt()
    assert ((freq - expected).abs() <= 4 * sd).all()


def test_sampling_never_picks_filtered_tokens() -> None:
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.3, top_k=5, top_p=0.9, min_p=0.05, seed=1)
    tokens = sample_next(logits, params, make_generator(params))
    allowed = filter_logits(logits, params)
    assert torch.isfinite(allowed.gather(1, tokens[:, None])).all()


def test_per_row_params_in_one_batch() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [4.0, 0.0, 1.0]])
    rows = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1, seed=3)]
    assert sample_next(logits, rows).tolist() == [1, 0]
    with pytest.raises(UsageError):
        sample_next(logits, rows[:1])
