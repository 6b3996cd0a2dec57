from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One OPT_HOME for the whole session (CI sets its own), so the default model's GGUF is converted
# once and every later load reads the cached safetensors.
os.environ.setdefault("OPT_HOME", str(Path(tempfile.gettempdir()) / "openpto-test-home"))


@pytest.fixture
def tmp_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh database file for one test (the shared OPT_HOME keeps its model cache)."""
    path = tmp_path / "opt.db"
    monkeypatch.setenv("OPT_DB", str(path))
    return path


@pytest.fixture
def tiny_model():  # type: ignore[no-untyped-def]
    from tests.helpers import tiny_llama

    return tiny_llama()


@pytest.fixture
def tiny_tok():  # type: ignore[no-untyped-def]
    from tests.helpers import tiny_tokenizer

    return tiny_tokenizer()


_SESSION: list[pytest.Session] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    _SESSION.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without the interpreter's teardown once pytest has reported everything.

    A whole-suite run loads torch, MLX, llguidance and the Agents SDK into one process, and the
    native libraries' exit-time destructors then crash it now and then (SIGSEGV after the last
    line of the report, with no Python frame and no thread left running): the run's result is
    already decided, so the process ends with it rather than with the destructors' crash.
    """
    if not _SESSION:
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_SESSION[0].exitstatus))
