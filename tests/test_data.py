from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openpto.data import (
    CALIBRATION_DEFAULT,
    EVALUATION_DEFAULT,
    OverlapWarning,
    TextSource,
    calibration_batches,
    load_text,
    sample_windows,
    tokenize_text,
)
from openpto.errors import DataError, UsageError


def _words(text: str) -> list[str]:
    # Independent of the library's own n-gram code: punctuation to spaces, then whitespace words.
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


# -- built-in corpora ------------------------------------------------------------------------


def test_builtin_corpora_are_large_and_hashed() -> None:
    calib = load_text(None, default=CALIBRATION_DEFAULT)
    evals = load_text(None)
    assert calib.name == "pydoc-topics" and evals.name == EVALUATION_DEFAULT == "stdlib-docstrings"
    for source in (calib, evals):
        assert len(source.text) > 300_000
        assert source.sha256 == hashlib.sha256(source.text.encode()).hexdigest()
    # Deterministic: a second load gives the same bytes.
    assert load_text("stdlib-docstrings").sha256 == evals.sha256
    assert "Return" in evals.text and "Abstract Base Classes" in evals.text


def test_evaluation_text_ignores_methods_patched_in_by_libraries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging

    from openpto.data.corpora import _stdlib_docstrings, stdlib_docstrings

    def warning_twice(self: logging.Logger) -> None:
        """A method some library added to a standard-library class at import time."""

    before = stdlib_docstrings()
    monkeypatch.setattr(logging.Logger, "warning_twice", warning_twice, raising=False)
    assert _stdlib_docstrings.__wrapped__() == before


def test_evaluation_text_shares_no_long_ngram_with_calibration_text() -> None:
    calib = load_text("pydoc-topics").text
    evals = load_text("stdlib-docstrings").text
    assert not _ngrams(evals, 8) & _ngrams(calib, 8)
    # No long line is copied either (a check on raw characters, not words).
    calib_lines = {line.strip() for line in calib.splitlines() if len(line.strip()) >= 50}
    eval_lines = {line.strip() for line in evals.splitlines() if len(line.strip()) >= 50}
    assert len(eval_lines) > 1000
    assert not calib_lines & eval_lines
    # Documents are deduplicated: no paragraph of 200+ characters appears twice.
    paragraphs = [p for p in evals.split("\n\n") if len(p) >= 200]
    assert len(paragraphs) == len(set(paragraphs))


# -- files, folders, JSONL -------------------------------------------------------------------


def test_plain_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("hello world\n", encoding="utf-8")
    source = load_text(str(path))
    assert source == TextSource("a.txt", str(path.resolve()), "hello world\n",
                                hashlib.sha256(b"hello world\n").hexdigest())


def test_folder_reads_txt_and_md_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "skip.json").write_text("{}")
    source = load_text(tmp_path)
    assert source.text == "first\n\nsecond\n\nthird"
    assert source.name == tmp_path.name


def test_jsonl_text_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_text(path).text == "one\n\ntwo"
    assert load_text(path, text_field="body").text == "uno\n\ndos"
    with pytest.raises(DataError, match=r"d.jsonl:1 has no string field 'missing'"):
        load_text(path, text_field="missing")
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"d.jsonl:2 is not valid JSON"):
        load_text(path)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match="empty"):
        load_text(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(DataError, match="not UTF-8"):
        load_text(binary)
    (tmp_path / "no-text").mkdir()
    (tmp_path / "no-text" / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="holds no"):
        load_text(tmp_path / "no-text")
    # Neither a path nor a built-in: looked up as a cached data set, offline, and not found.
    with pytest.raises(DataError, match=r"not a file, a folder, a built-in corpus \(pydoc-topics"):
        load_text("no-such-corpus-anywhere")


# -- tokens and sampling ---------------------------------------------------------------------


def test_tokenize_text_round_trips_without_special_tokens(tiny_tok) -> None:  # type: ignore[no-untyped-def]
    text = "def f(x):\n    return x + 1  # plain text"
    ids = tokenize_text(tiny_tok, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert tiny_tok.bos_token_id not in ids.tolist() and tiny_tok.eos_token_id not in ids.tolist()
    assert tiny_tok.decode(ids.tolist()) == text


@settings(max_examples=200, deadline=None)
@given(
    n_tokens=st.integers(1, 5000),
    n_samples=st.integers(1, 64),
    seq_len=st.integers(1, 300),
    seed=st.integers(0, 2**32),
)
def test_sample_windows_properties(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> None:
    if n_tokens < seq_len:
        with pytest.raises(DataError, match="fewer than one window"):
            sample_windows(n_tokens, n_samples, seq_len, seed)
        return
    sample = sample_windows(n_tokens, n_samples, seq_len, seed)
    assert sample == sample_windows(n_tokens, n_samples, seq_len, seed)  # deterministic
    assert len(sample.starts) == n_samples
    assert all(0 <= s <= n_tokens - seq_len for s in sample.starts)
    assert sample.overlapping == (n_tokens // seq_len < n_samples)
    if not sample.overlapping:
        # Distinct windows never share a token.
        covered = [t for s in sample.starts for t in range(s, s + seq_len)]
        assert len(covered) == len(set(covered))


def test_different_seeds_give_different_samples() -> None:
    samples = {sample_windows(100_000, 16, 128, seed).starts for seed in range(20)}
    assert len(samples) == 20
    overlapping = {sample_windows(1000, 16, 128, seed).starts for seed in range(20)}
    assert len(overlapping) == 20


def test_sample_windows_rejects_bad_sizes() -> None:
    with pytest.raises(UsageError):
        sample_windows(100, 0, 10, 0)
    with pytest.raises(UsageError):
        sample_windows(100, 4, 0, 0)


def test_calibration_batches_are_slices_of_the_token_stream(tiny_tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    batches = calibration_batches(tiny_tok, None, n_samples=8, seq_len=64, seed=3)
    stream = tokenize_text(tiny_tok, load_text("pydoc-topics")).tolist()
    assert batches.shape == (8, 64) and batches.dtype == torch.long
    text = " ".join(map(str, stream))
    for row in batches.tolist():
        assert " ".join(map(str, row)) in text
    assert torch.equal(batches, calibration_batches(tiny_tok, "pydoc-topics", 8, 64, seed=3))
    assert not torch.equal(batches, calibration_batches(tiny_tok, "pydoc-topics", 8, 64, seed=4))

    short = tmp_path / "short.txt"
    short.write_text("a few words of text, repeated a few times. " * 5)
    messages: list[str] = []
    rows = calibration_batches(tiny_tok, str(short), 20, 16, seed=0, log=messages.append)
    assert rows.shape == (20, 16) and "overlap" in messages[0]
    with pytest.warns(OverlapWarning):
        calibration_batches(tiny_tok, str(short), 20, 16, seed=0)
    with pytest.raises(DataError, match="fewer than one window of 4096"):
        calibration_batches(tiny_tok, str(short), 1, 4096, seed=0)


def test_datasets_are_recorded(tmp_db: Path, tiny_tok) -> None:  # type: ignore[no-untyped-def]
    from openpto.pipeline import open_run
    from openpto.store import Store

    store = Store()
    with open_run("calibrate", "m", {}, store=store) as wf:
        source = wf.load_text(None, default=CALIBRATION_DEFAULT)
        ids = wf.tokenize(tiny_tok, source, role="calib")
    (row,) = store.rows("datasets")
    assert row["name"] == "pydoc-topics" and row["source"] == "python:pydoc_data.topics"
    assert row["sha256"] == source.sha256 and row["tokens"] == len(ids)
    run = store.rows("runs")[0]
    assert json.loads(run["config"])["calib_data"]["sha256"] == source.sha256
    assert {t["name"] for t in store.rows("traces")} == {"data", "tokenize"}


class _FakeRows:
    column_names = ("text", "label")
    _fingerprint = "abc123"

    def __getitem__(self, column: str) -> list[object]:
        return {"text": ["first row", None, "second row"], "label": [0, 1, 2]}[column]


def test_cached_datasets_are_read_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``datasets`` branch, through a stand-in module with ``load_dataset``'s signature."""
    import os
    import sys
    import types

    calls: list[tuple[object, ...]] = []

    def load_dataset(name: str, config: str | None, split: str) -> _FakeRows:
        calls.append((name, config, split, os.environ.get("HF_DATASETS_OFFLINE")))
        if name == "not/cached":
            raise FileNotFoundError("Couldn't find a dataset script at not/cached\nmore detail")
        return _FakeRows()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    source = load_text("wikitext:wikitext-2-raw-v1:validation")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation", "1")]
    assert source.text == "first row\n\nsecond row"  # non-string rows are skipped
    assert source.source == "datasets:wikitext:wikitext-2-raw-v1:validation@abc123"
    load_text("owner/name")
    assert calls[-1][:3] == ("owner/name", None, "test")
    with pytest.raises(DataError, match="has no column 'body'"):
        load_text("owner/name", text_field="body")
    with pytest.raises(DataError, match=r"local cache: FileNotFoundError: Couldn't find") as info:
        load_text("not/cached")
    assert "\n" not in str(info.value)
