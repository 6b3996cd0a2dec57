"""The one rules module (core.steps): stop strings across token boundaries, end of sequence,
length limits, finish reasons, timings and memory, on a real byte-level BPE tokenizer."""

from __future__ import annotations

import pytest

from openpto.core.sampling import SamplingParams
from openpto.core.steps import RequestRules, StepRecord, stream_records
from tests.helpers import tiny_tokenizer

TEXT = "naïve café — 日本語 ✓ done, then more text follows here"


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ids(tok) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(i) for i in tok(TEXT, add_special_tokens=False)["input_ids"]]


class _Clock:
    """``time`` for core.steps: advances by a fixed amount per reading."""

    def __init__(self, tick: float) -> None:
        self.now = 100.0
        self.tick = tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def run(tok, ids, params, eos=(), **kwargs) -> list[StepRecord]:  # type: ignore[no-untyped-def]
    return list(stream_records(ids, RequestRules(tok, [], params, eos, **kwargs)))


def test_plain_text_is_reassembled_exactly(tok, ids) -> None:  # type: ignore[no-untyped-def]
    records = run(tok, ids, SamplingParams(max_tokens=len(ids)))
    assert "".join(r.text for r in records) == TEXT
    assert [r.index for r in records] == list(range(len(ids)))
    assert [r.token_id for r in records] == ids
    assert all("\ufffd" not in r.text for r in records)
    assert [r.finish_reason for r in records] == [None] * (len(ids) - 1) + ["length"]
    assert all(r.tokens == 1 for r in records)


def _token_boundaries(tok, ids) -> list[int]:  # type: ignore[no-untyped-def]
    """Complete characters decoded after each token (a token may end inside a character)."""
    return [len(tok.decode(ids[:i]).rstrip("\ufffd")) for i in range(1, len(ids) + 1)]


@pytest.mark.parametrize("stop", ["日本", "é —", "✓ d", "done,", "e text f", "here"])
def test_stop_string_across_token_boundaries(tok, ids, stop: str) -> None:  # type: ignore[no-untyped-def]
    ends = _token_boundaries(tok, ids)
    start = TEXT.find(stop)
    # The stop string spans at least one token boundary: no single token holds all of it.
    assert any(start < e < start + len(stop) for e in ends) or len(stop) == 1
    records = run(tok, ids, SamplingParams(max_tokens=len(ids), stop=(stop, "never")))
    assert "".join(r.text for r in records) == TEXT[:start]
    assert records[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in records[:-1])
    # It finishes on the token that completes the stop string, not later.
    completing = next(i for i, e in enumerate(ends) if e >= start + len(stop))
    assert records[-1].index == completing


def test_a_possible_stop_prefix_is_held_back_then_released(tok, ids) -> None:  # type: ignore[no-untyped-def]
    # "done!" never occurs, but "done" does: the text "done" waits until "," rules it out.
    records = run(tok, ids, SamplingParams(max_tokens=len(ids), stop=("done!",)))
    assert "".join(r.text for r in records) == TEXT
    emitted = ""
    for record in records:
        emitted += record.text
        assert not emitted.endswith("done")  # never shown while it could still become "done!"


def test_eos_finishes_with_its_id_and_counts_no_token(tok, ids) -> None:  # type: ignore[no-untyped-def]
    eos = ids[5]
    records = run(tok, ids, SamplingParams(max_tokens=100), eos=[eos])
    assert [r.token_id for r in records] == ids[:6]
    assert records[-1].finish_reason == "stop" and records[-1].tokens == 0
    assert records[-1].generated == 6
    assert "".join(r.text for r in records) == tok.decode(ids[:5])


def test_length_limits_max_tokens_and_context(tok, ids) -> None:  # type: ignore[no-untyped-def]
    records = run(tok, ids, SamplingParams(max_tokens=7))
    assert len(records) == 7 and records[-1].finish_reason == "length"
    # The held-back text is released at the limit: a stop prefix cannot wait any longer.
    held = run(tok, ids[:7], SamplingParams(max_tokens=7, stop=(tok.decode(ids[5:8]),)))
    assert "".join(r.text for r in held) == tok.decode(ids[:7])
    rules = RequestRules(tok, [1, 2, 3], SamplingParams(max_tokens=100), context_length=8)
    records = list(stream_records(ids, rules))
    assert len(records) == 5 and records[-1].finish_reason == "length"  # 3 + 5 fill 8


def test_a_generator_that_runs_out_ends_with_length(tok, ids) -> None:  # type: ignore[no-untyped-def]
    records = run(tok, ids[:4], SamplingParams(max_tokens=50, stop=(tok.decode(ids[3:6]),)))
    assert [r.token_id for r in records] == [*ids[:4], None]
    assert records[-1].finish_reason == "length" and records[-1].tokens == 0
    assert "".join(r.text for r in records) == tok.decode(ids[:4])


def test_cancelled_and_error_records(tok, ids) -> None:  # type: ignore[no-untyped-def]
    rules = RequestRules(tok, [], SamplingParams(max_tokens=50))
    first = rules.push(ids[0])
    cancelled = rules.end("cancelled")
    assert cancelled.token_id is None and cancelled.finish_reason == "cancelled"
    assert cancelled.index == 1 and cancelled.generated == 1 and cancelled.ttft_s == first.ttft_s
    with pytest.raises(RuntimeError, match="already finished"):
        rules.push(ids[1])
    failed = RequestRules(tok, [7, 8], SamplingParams()).end("error", "boom")
    assert (failed.finish_reason, failed.error, failed.prompt_tokens) == ("error", "boom", 2)
    assert failed.generated == 0 and failed.text == ""


def test_timings_and_memory_follow_the_clock(tok, ids, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = _Clock(0.5)
    monkeypatch.setattr("openpto.core.steps.time", clock)
    readings = iter(range(1000, 2000, 10))
    rules = RequestRules(tok, [1, 2], SamplingParams(max_tokens=4), arrived=99.0,
                         memory=lambda: next(readings))
    records = list(stream_records(ids, rules))
    # start() reads 100.5; each push reads once more (0.5 s later).
    assert [r.ttft_s for r in records] == [0.5] * 4
    assert [r.step_s for r in records] == [0.5] * 4
    assert [r.elapsed_s for r in records] == [0.5, 1.0, 1.5, 2.0]
    assert [r.tokens_per_second for r in records] == [2.0] * 4
    assert [r.memory_bytes for r in records] == [1000, 1010, 1020, 1030]
    last = records[-1]
    assert last.queued_s == pytest.approx(1.5) and last.total_seconds == pytest.approx(3.5)
    assert last.prefill_seconds == 0.5 and last.decode_seconds == 1.5
    assert last.prompt_tokens == 2


def test_merge_keeps_text_and_tokens_in_order() -> None:
    a = StepRecord(token_id=1, text="ab", index=0, tokens=1, prompt_tokens=3)
    b = StepRecord(token_id=2, text="c", index=1, tokens=1, elapsed_s=2.0)
    end = StepRecord(token_id=None, index=2, finish_reason="length")
    merged = a.merge(b).merge(end)
    assert (merged.text, merged.tokens, merged.prompt_tokens) == ("abc", 2, 3)
    assert merged.finish_reason == "length" and merged.index == 2
