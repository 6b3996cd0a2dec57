"""The token generator on a tiny random Llama: text assembly, stops, eos, batching, timings."""

from __future__ import annotations

import pytest
import torch

from openpto.core.detokenize import TextStream
from openpto.core.generate import (
    build_chat_prompt,
    encode_prompt,
    generate_batch,
    generate_batch_stream,
    generate_stream,
    generate_text,
    left_pad,
)
from openpto.core.sampling import SamplingParams, apply_repetition_penalty
from openpto.errors import UsageError
from tests.helpers import one_thread, tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


PROMPTS = [
    "def foo(x):",
    "The quick brown fox jumps over the lazy dog, then it returns to the start.",
    "a",
    "import os\nimport sys\n",
]


def lively_llama(layers: int = 2, seed: int = 0):  # type: ignore[no-untyped-def]
    """A tiny Llama with larger weights, so greedy text varies instead of repeating one token."""
    model = tiny_llama(num_hidden_layers=layers, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.15, generator=gen)
    return model


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return lively_llama()


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


def test_greedy_stream_matches_full_forward_argmax(model, tok) -> None:  # type: ignore[no-untyped-def]
    ids = encode_prompt(tok, PROMPTS[1])
    result = generate_text(model, tok, ids, SamplingParams(max_tokens=12), ignore_eos=True)
    # Reference without any cache: re-run the whole sequence every step.
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert result.token_ids == seq[len(ids) :]
    assert result.finish_reason == "length"


def test_batched_greedy_equals_one_by_one(model, tok) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=24)
    alone = [generate_text(model, tok, p, params, ignore_eos=True) for p in PROMPTS]
    together = generate_batch(model, tok, PROMPTS, params, ignore_eos=True)
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
    assert len({len(encode_prompt(tok, p)) for p in PROMPTS}) == len(PROMPTS)


def test_batch_rows_finish_independently(model, tok) -> None:  # type: ignore[no-untyped-def]
    params = [SamplingParams(max_tokens=3), SamplingParams(max_tokens=7)]
    steps = list(generate_batch_stream(model, tok, PROMPTS[:2], params, ignore_eos=True))
    assert len(steps) == 7
    assert [r is None for r in steps[3]] == [True, False]
    last_first = steps[2][0]
    assert last_first is not None and last_first.finish_reason == "length"


def test_left_pad_positions_start_at_zero() -> None:
    ids, mask, pos = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_stop_string_cuts_text_and_is_not_emitted(model, tok) -> None:  # type: ignore[no-untyped-def]
    base = generate_text(model, tok, PROMPTS[0], SamplingParams(max_tokens=40), ignore_eos=True)
    text = base.text
    stop = text[15:19]
    assert stop.strip(), "the tiny model should produce varied text"
    cut = text.find(stop)
    records = list(
        generate_stream(
            model, tok, PROMPTS[0], SamplingParams(max_tokens=40, stop=(stop,)), ignore_eos=True
        )
    )
    assert "".join(r.text for r in records) == text[:cut]
    assert records[-1].finish_reason == "stop"
    assert all(r.finish_reason is None for r in records[:-1])
    assert stop not in "".join(r.text for r in records)


def test_eos_token_stops_with_empty_text(model, tok) -> None:  # type: ignore[no-untyped-def]
    base = generate_text(model, tok, PROMPTS[0], SamplingParams(max_tokens=20), ignore_eos=True)
    eos = base.token_ids[5]
    first = base.token_ids.index(eos)
    result = list(
        generate_stream(model, tok, PROMPTS[0], SamplingParams(max_tokens=20), eos_token_ids=[eos])
    )
    assert [r.token_id for r in result] == base.token_ids[: first + 1]
    assert result[-1].finish_reason == "stop" and result[-1].text == ""


def test_text_stream_never_emits_broken_characters(tok) -> None:  # type: ignore[no-untyped-def]
    text = "naïve café — 日本語 ✓ done"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text) // 2  # byte-level pieces: some tokens end mid-character
    stream = TextStream(tok)
    pieces = [stream.push(i)[0] for i in ids] + [stream.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


@pytest.mark.parametrize("stop", ["日本", "é —", "done", "✓ d", "zzz"])
def test_text_stream_stop_strings(tok, stop: str) -> None:  # type: ignore[no-untyped-def]
    text = "naïve café — 日本語 ✓ done"
    stream = TextStream(tok, stop=[stop, "never"])
    out = []
    stopped = False
    for i in tok(text)["input_ids"]:
        piece, stopped = stream.push(i)
        out.append(piece)
        if stopped:
            break
    if not stopped:
        out.append(stream.finish())
    expected = text[: text.find(stop)] if stop in text else text
    assert "".join(out) == expected
    assert stopped == (stop in text)


def test_seeded_sampling_is_reproducible(model, tok) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=11, max_tokens=16)
    a = generate_text(model, tok, PROMPTS[2], params, ignore_eos=True)
    b = generate_text(model, tok, PROMPTS[2], params, ignore_eos=True)
    c = generate_text(model, tok, PROMPTS[2], params.replace(seed=12), ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_repetition_penalty_follows_reference_loop(model, tok) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=16, repetition_penalty=1.8)
    ids = encode_prompt(tok, PROMPTS[3])
    result = generate_text(model, tok, ids, params, ignore_eos=True)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(16):
            logits = model(torch.tensor([seq])).logits[:, -1]
            logits = apply_repetition_penalty(logits, torch.tensor([seq]), 1.8)
            seq.append(int(logits.argmax()))
    assert result.token_ids == seq[len(ids) :]
    # On a model that greedily repeats its prompt token, the penalty moves it off that token.
    dull = tiny_llama()
    plain = generate_text(dull, tok, "a", SamplingParams(max_tokens=8), ignore_eos=True)
    moved = generate_text(dull, tok, "a", params.replace(max_tokens=8), ignore_eos=True)
    assert plain.token_ids == [tok("a")["input_ids"][0]] * 8
    assert tok("a")["input_ids"][0] not in moved.token_ids


def test_step_records_carry_timings(model, tok) -> None:  # type: ignore[no-untyped-def]
    records = list(generate_stream(model, tok, PROMPTS[1], SamplingParams(max_tokens=6)))
    assert [r.index for r in records] == list(range(len(records)))
    first = records[0]
    assert first.prompt_tokens == len(encode_prompt(tok, PROMPTS[1]))
    assert first.step_s == pytest.approx(first.ttft_s)
    assert all(r.ttft_s == first.ttft_s for r in records)
    assert records[-1].elapsed_s == pytest.approx(sum(r.step_s for r in records))
    assert records[-1].tokens_per_second == pytest.approx(len(records) / records[-1].elapsed_s)


def test_chat_prompt_uses_template(tok) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="chat template"):
        build_chat_prompt(tok, [{"role": "user", "content": "hi"}])
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    try:
        text = build_chat_prompt(tok, [{"role": "user", "content": "hi"}])
        assert text == "<s>user: hi\nassistant:"
        ids = encode_prompt(tok, "hi", chat=True)
        assert ids.count(tok.bos_token_id) == 1
        with pytest.raises(UsageError, match="role"):
            build_chat_prompt(tok, [{"content": "hi"}])
    finally:
        tok.chat_template = None


def test_empty_inputs_are_usage_errors(model, tok) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError):
        generate_batch(model, tok, [])
    with pytest.raises(UsageError):
        generate_text(model, tok, "", SamplingParams(max_tokens=2))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("tiny-generate")
    lively_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _opt(args: list[str]):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from openpto.cli.main import app

    return CliRunner().invoke(app, args)


def test_cli_generate_json_and_stream(tiny_folder, model, tok, tmp_db) -> None:  # type: ignore[no-untyped-def]
    import json

    result = _opt(["generate", str(tiny_folder), "--prompt", PROMPTS[0], "--max-new-tokens",
                   "10", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = generate_text(model, tok, PROMPTS[0], SamplingParams(max_tokens=10))
    assert data["text"] == expected.text
    assert data["tokens"] == expected.tokens
    assert data["tokens_per_second"] > 0 and data["run_id"]
    streamed = _opt(["generate", str(tiny_folder), "--prompt", PROMPTS[0], "--max-new-tokens",
                     "10"])
    assert streamed.exit_code == 0
    assert streamed.stdout == expected.text + "\n"
    from openpto.store import Store

    runs = [r for r in Store().rows("runs") if r["kind"] == "generate"]
    assert len(runs) == 2 and all(r["status"] == "succeeded" for r in runs)


def test_cli_generate_stop_and_bad_options(tiny_folder, tmp_db) -> None:  # type: ignore[no-untyped-def]
    import json

    base = json.loads(_opt(["generate", str(tiny_folder), "--prompt", PROMPTS[1],
                            "--max-new-tokens", "30", "--json"]).stdout)["text"]
    stop = base[10:13]
    cut = json.loads(_opt(["generate", str(tiny_folder), "--prompt", PROMPTS[1],
                           "--max-new-tokens", "30", "--stop", stop, "--json"]).stdout)["text"]
    assert cut == base[: base.find(stop)]
    for flag, value, fragment in [("--top-p", "1.5", "top_p"), ("--temperature", "-1",
                                  "temperature"), ("--max-new-tokens", "0", "max_tokens")]:
        result = _opt(["generate", str(tiny_folder), "--prompt", "x", flag, value])
        assert isinstance(result.exception, UsageError), flag
        assert fragment in str(result.exception)
