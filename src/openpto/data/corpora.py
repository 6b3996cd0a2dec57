"""Built-in corpora: text that ships with every Python, so calibration and evaluation never need
a download.

- ``pydoc-topics`` (the calibration default): Python's ``pydoc_data.topics``, the help topics
  generated from the language reference, joined in sorted key order.
- ``stdlib-docstrings`` (the evaluation default): the docstrings of a fixed list of pure-Python
  standard-library modules and of their public classes, functions and methods, gathered with
  ``inspect.getdoc`` in a fixed order, each paragraph once. It is mostly English prose about the
  library, not the language reference; any docstring that shares a run of ``OVERLAP_WORDS``
  words with the calibration text is left out, so the two never overlap (a test checks it).

Both texts depend on the Python version (docstrings change between releases); every run records
the sha256 and token count of the text it used.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable, Iterator

#: Modules whose docstrings form ``stdlib-docstrings``. Pure-Python modules present in every
#: CPython from 3.10 on; ``pdb``/``bdb`` are left out because pydoc's "debugger" topic repeats
#: their help text, and modules removed in 3.12/3.13 (``cgi``, ``telnetlib``, ...) never appear.
EVAL_MODULES: tuple[str, ...] = (
    "abc", "argparse", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "doctest", "email.message", "email.utils", "enum",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser",
    "http.client", "http.cookies", "http.server", "imaplib", "ipaddress", "itertools", "json",
    "locale", "logging", "logging.handlers", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "os", "os.path", "pathlib", "pickle", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "types", "typing", "unittest", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zipimport",
)

#: Two texts overlap when they share this many consecutive words (lower-cased, punctuation
#: dropped). Eight words is far longer than common phrases yet catches any copied sentence.
OVERLAP_WORDS = 8

#: Docstrings shorter than this many words are signatures or one-word labels, not prose.
_MIN_WORDS = 8

_WORD = re.compile(r"[a-z0-9]+")


def pydoc_topics() -> str:
    """The calibration default: ``pydoc_data.topics`` joined in sorted key order."""
    return _pydoc_topics()


@functools.lru_cache(maxsize=1)
def _pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def stdlib_docstrings() -> str:
    """The evaluation default: standard-library docstrings that never overlap ``pydoc-topics``."""
    return _stdlib_docstrings()


@functools.lru_cache(maxsize=1)
def _stdlib_docstrings() -> str:
    calibration = word_ngrams(pydoc_topics(), OVERLAP_WORDS)
    kept = [
        doc for doc in _gather_docstrings(EVAL_MODULES)
        if not word_ngrams(doc, OVERLAP_WORDS) & calibration
    ]
    return "\n\n".join(kept)


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words (lower-cased letters and digits) in ``text``."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _gather_docstrings(module_names: tuple[str, ...]) -> list[str]:
    # Deduplicated by paragraph, not only by docstring: subclasses and wrappers often repeat a
    # paragraph of their base's text, and a repeat inside one window would be free to predict.
    seen: set[str] = set()
    docs: list[str] = []
    for doc in _walk(module_names):
        if not doc:
            continue
        fresh = [p for p in doc.split("\n\n") if p.strip() and p not in seen]
        seen.update(fresh)
        text = "\n\n".join(fresh)
        if len(text.split()) >= _MIN_WORDS:
            docs.append(text)
    return docs


def _walk(module_names: tuple[str, ...]) -> Iterator[str | None]:
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            # A stripped-down Python may lack a module; the text's sha256 records the difference.
            continue
        yield inspect.getdoc(module)
        public = [n for n in dir(module) if not n.startswith("_")]
        names = getattr(module, "__all__", None) or public
        for name in sorted(set(names)):
            obj = getattr(module, name, None)
            if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _defined_in(obj, module):
                continue
            yield inspect.getdoc(obj)
            if inspect.isclass(obj):
                yield from _member_docs(obj, module)


def _defined_in(obj: object, module: object) -> bool:
    # Re-exported names (``os.path`` functions inside ``os``, ``typing`` aliases) belong to the
    # module that defines them; counting them once keeps the text free of accidental repeats.
    owner = getattr(obj, "__module__", None)
    name = getattr(module, "__name__", "")
    return owner is None or owner == name or owner.startswith(name + ".")


def _member_docs(cls: type, module: object) -> Iterator[str | None]:
    for attr in sorted(vars(cls)):
        if attr.startswith("_"):
            continue
        value = vars(cls)[attr]
        func = value.fget if isinstance(value, property) else value
        func = func.__func__ if isinstance(func, (classmethod, staticmethod)) else func
        # Libraries patch methods onto stdlib classes (transformers adds ``Logger.warning_once``);
        # only members defined in the module itself keep the text the same in every process.
        if not inspect.isroutine(func) or not _defined_in(func, module):
            continue
        if isinstance(value, property):
            yield inspect.cleandoc(value.__doc__) if value.__doc__ else None
        else:
            yield inspect.getdoc(func)


#: Built-in corpus name -> function returning its text.
BUILTIN_CORPORA: dict[str, Callable[[], str]] = {
    "pydoc-topics": pydoc_topics,
    "stdlib-docstrings": stdlib_docstrings,
}

#: Where each built-in corpus comes from, as recorded in the ``datasets`` table.
BUILTIN_SOURCES: dict[str, str] = {
    "pydoc-topics": "python:pydoc_data.topics",
    "stdlib-docstrings": "python:inspect.getdoc(stdlib)",
}

CALIBRATION_DEFAULT = "pydoc-topics"
EVALUATION_DEFAULT = "stdlib-docstrings"
