"""The server's continuous-batching scheduler on a tiny model: every request gets exactly the
tokens, text and finish reason of single-stream generation (``core.generate``), batched or alone,
because both push their tokens through the same ``core.steps.RequestRules``."""

from __future__ import annotations

import asyncio
import threading

import pytest

from openpto.core.generate import eos_ids, generate_stream
from openpto.core.sampling import SamplingParams
from openpto.core.static_decode import StaticDecoder, kept_decoder, release_static_decoders
from openpto.core.steps import StepRecord
from openpto.engines.batching import BatchScheduler
from openpto.engines.streams import RequestStream
from tests.helpers import one_thread, tiny_tokenizer
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


def alone(model, tok, ids, params, eos) -> list[StepRecord]:  # type: ignore[no-untyped-def]
    return list(generate_stream(model, tok, ids, params, eos_token_ids=eos, ignore_eos=not eos,
                                decode="dynamic"))


def served(scheduler: BatchScheduler, requests: list[tuple[list[int], SamplingParams]],
           together: bool = True) -> list[list[StepRecord]]:
    """Submit every request, then read each stream to its end. ``together`` holds the scheduler
    until all are queued, so they are admitted as one batch."""
    loop = asyncio.new_event_loop()
    gate = threading.Event()
    if together:
        scheduler._inbox.put(gate.wait)  # the scheduler runs inbox jobs inline: it waits here
    streams = [RequestStream(loop, max_pending=100_000) for _ in requests]
    for (ids, params), stream in zip(requests, streams, strict=True):
        scheduler.submit(ids, params, stream)
    gate.set()
    out: list[list[StepRecord]] = []
    try:
        for stream in streams:
            records: list[StepRecord] = []
            while not stream.finished:
                records.extend(loop.run_until_complete(stream.next_events(timeout=60)))
            out.append(records)
    finally:
        loop.close()
    return out


def same(got: list[StepRecord], want: list[StepRecord]) -> None:
    assert [r.token_id for r in got] == [r.token_id for r in want]
    assert "".join(r.text for r in got) == "".join(r.text for r in want)
    assert got[-1].finish_reason == want[-1].finish_reason
    assert [r.index for r in got] == [r.index for r in want]
    assert sum(r.tokens for r in got) == sum(r.tokens for r in want)


def test_concurrent_greedy_requests_get_the_single_stream_tokens(model, tok) -> None:  # type: ignore[no-untyped-def]
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    probe = alone(model, tok, ids[0], SamplingParams(max_tokens=30), eos=[])
    stop = "".join(r.text for r in probe)[12:15]
    eos = probe[9].token_id  # an early end-of-sequence for the request that meets it
    assert stop.strip() and eos is not None
    requests = [(ids[0], SamplingParams(max_tokens=30, stop=(stop,))),
                (ids[1], SamplingParams(max_tokens=25)),
                (ids[2], SamplingParams(max_tokens=7)),
                (ids[3], SamplingParams(max_tokens=40)),
                (ids[0], SamplingParams(max_tokens=30))]
    scheduler = BatchScheduler(model, tok, eos={eos}, max_batch=8, threads=1)
    try:
        got = served(scheduler, requests)
    finally:
        scheduler.close()
    expected = [alone(model, tok, i, p, eos=[eos]) for i, p in requests]
    for g, e in zip(got, expected, strict=True):
        same(g, e)
    finishes = [g[-1].finish_reason for g in got]
    assert finishes[0] == "stop" and finishes[2] == "length"
    assert got[4][-1].token_id == eos and got[4][-1].tokens == 0  # the eos record
    assert len({len(g) for g in got}) > 2  # rows left the batch at different steps
    assert all(r.prompt_tokens == len(i) for g, (i, _) in zip(got, requests, strict=True)
               for r in g)


def test_more_requests_than_rows_and_a_lone_request(model, tok) -> None:  # type: ignore[no-untyped-def]
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    requests = [(ids[i % 4], SamplingParams(max_tokens=6 + 3 * i)) for i in range(6)]
    scheduler = BatchScheduler(model, tok, eos=eos_ids(model, tok), max_batch=2, threads=1)
    try:
        got = served(scheduler, requests)
        lone = served(scheduler, [requests[3]], together=False)[0]
    finally:
        scheduler.close()
    for g, (i, p) in zip(got, requests, strict=True):
        same(g, alone(model, tok, i, p, eos=eos_ids(model, tok)))
    same(lone, alone(model, tok, *requests[3], eos=eos_ids(model, tok)))


def test_the_last_row_of_a_batch_returns_to_the_static_decoder(model, tok) -> None:  # type: ignore[no-untyped-def]
    # What CUDA does with the graph decoder, on CPU with the same static cache stepped eagerly.
    release_static_decoders()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    requests = [(ids[1], SamplingParams(max_tokens=40)), (ids[2], SamplingParams(max_tokens=5))]
    scheduler = BatchScheduler(model, tok, eos=set(), max_batch=4, threads=1, decode="static",
                               lone_after_batch=True)
    try:
        got = served(scheduler, requests)
    finally:
        scheduler.close()
    for g, (i, p) in zip(got, requests, strict=True):
        same(g, alone(model, tok, i, p, eos=[]))
    decoder = kept_decoder(model)
    assert isinstance(decoder, StaticDecoder) and not decoder.busy


def test_seeded_sampling_alone_matches_generate(model, tok) -> None:  # type: ignore[no-untyped-def]
    ids = tok(PROMPTS[0])["input_ids"]
    params = SamplingParams(temperature=0.9, top_k=40, seed=5, max_tokens=24)
    scheduler = BatchScheduler(model, tok, eos=set(), threads=1)
    try:
        (got,) = served(scheduler, [(ids, params)], together=False)
    finally:
        scheduler.close()
    want = list(generate_stream(model, tok, ids, params, ignore_eos=True))
    assert len({r.token_id for r in want}) > 3
    same(got, want)
    assert got[-1].queued_s >= 0 and got[-1].elapsed_s > 0
