"""Where text comes from: a built-in corpus, a text file, a folder, JSONL, or a cached data set.

``load_text(spec)`` resolves ``spec`` in this order and returns a ``TextSource`` that carries the
text and its sha256, so every run can record exactly what it read:

1. ``None``: the default corpus given by the caller (evaluation or calibration).
2. A built-in corpus name (``pydoc-topics``, ``stdlib-docstrings``).
3. An existing folder: every ``*.txt`` and ``*.md`` below it, in sorted path order.
4. An existing ``.jsonl`` file: the ``text_field`` of every line.
5. Any other existing file: UTF-8 text.
6. ``NAME[:CONFIG][:SPLIT]``: a Hugging Face ``datasets`` data set that is already in the local
   cache (nothing is downloaded; the split defaults to ``test``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from openpto.data.corpora import BUILTIN_CORPORA, BUILTIN_SOURCES, EVALUATION_DEFAULT
from openpto.errors import DataError

#: Separator between documents (files of a folder, JSONL records, data set rows). A blank line
#: keeps documents apart for the tokenizer without inventing special tokens.
DOC_SEPARATOR = "\n\n"

_FOLDER_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class TextSource:
    """Text ready to tokenize, with what it is and where it came from."""

    name: str
    source: str
    text: str
    sha256: str

    @classmethod
    def from_text(cls, name: str, source: str, text: str) -> TextSource:
        return cls(name, source, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def load_text(
    spec: str | os.PathLike[str] | TextSource | None = None,
    *,
    default: str = EVALUATION_DEFAULT,
    text_field: str = "text",
) -> TextSource:
    """Resolve ``spec`` (see the module docstring) to a non-empty ``TextSource``."""
    if isinstance(spec, TextSource):
        source = spec
    else:
        source = _resolve(str(spec) if spec is not None else default, text_field)
    if not source.text.strip():
        raise DataError(f"the text {source.source} is empty")
    return source


def _resolve(spec: str, text_field: str) -> TextSource:
    if spec in BUILTIN_CORPORA:
        return TextSource.from_text(spec, BUILTIN_SOURCES[spec], BUILTIN_CORPORA[spec]())
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        if path.suffix == ".jsonl":
            return _read_jsonl(path, text_field)
        return TextSource.from_text(path.name, str(path.resolve()), _read_utf8(path))
    if _looks_like_path(spec):
        raise DataError(f"no such file or folder: {spec}")
    return _read_cached_dataset(spec, text_field)


def _looks_like_path(spec: str) -> bool:
    # A hub data set id has at most one "/" and no file suffix; anything else is a path typo.
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
        or Path(spec).suffix in (".txt", ".md", ".jsonl", ".json", ".text")
    )


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc


def _read_folder(folder: Path) -> TextSource:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _FOLDER_SUFFIXES
    )
    if not files:
        raise DataError(f"the folder {folder} holds no *.txt or *.md files")
    text = DOC_SEPARATOR.join(_read_utf8(p).strip() for p in files)
    return TextSource.from_text(folder.name, str(folder.resolve()), text)


def _read_jsonl(path: Path, text_field: str) -> TextSource:
    texts = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not valid JSON: {exc.msg}") from exc
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{path}:{number} has no string field {text_field!r} (--text-field)")
        texts.append(record[text_field])
    return TextSource.from_text(path.name, str(path.resolve()), DOC_SEPARATOR.join(texts))


def _read_cached_dataset(spec: str, text_field: str) -> TextSource:
    not_found = (
        f"{spec!r} is not a file, a folder, a built-in corpus ({', '.join(BUILTIN_CORPORA)}) "
        "or a data set in the local cache"
    )
    # Never reach a hub: set before ``datasets`` is first imported, which reads them once.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as exc:
        hint = " (reading cached data sets needs: pip install datasets)"
        raise DataError(not_found + hint) from exc
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "test")  # nosec B615  # the user names the data set and its revision
    except Exception as exc:  # datasets raises many unrelated types for "not cached"
        raise DataError(f"{not_found}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    if text_field not in rows.column_names:
        raise DataError(
            f"data set {spec!r} has no column {text_field!r} "
            f"(columns: {', '.join(rows.column_names)})"
        )
    text = DOC_SEPARATOR.join(t for t in rows[text_field] if isinstance(t, str))
    fingerprint = getattr(rows, "_fingerprint", "")
    return TextSource.from_text(spec, f"datasets:{spec}@{fingerprint}", text)
