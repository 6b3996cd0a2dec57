"""opt llm: logs import from logs.db files written by the real llm CLI in both of its schemas
(llm 0.36: threads/turns/messages; llm 0.31, kept in a side folder by make install: the legacy
responses table), prompt and cmd through llm's API, and llm missing. The model is an echo model
provided through llm's own plugin mechanism (an installed distribution with an entry point)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llm")

ECHO = '''
import llm


class Echo(llm.Model):
    model_id = "echo-test"
    can_stream = True

    def execute(self, prompt, stream, response, conversation):
        words = prompt.prompt.split()
        yield from [word + " " for word in words[:-1]] + words[-1:]
        response.set_usage(input=len(words), output=len(words))


@llm.hookimpl
def register_models(register):
    register(Echo())
'''

SRC = str(Path(__file__).resolve().parents[1] / "src")


def legacy_llm() -> Path:
    return Path(os.environ.get("OPT_TEST_LLM_LEGACY", Path(sys.prefix) / "side" / "llm-0.31"))


@pytest.fixture(scope="module")
def echo_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("echo-site")
    (site / "llm_echo_test.py").write_text(ECHO)
    info = site / "llm_echo_test-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-echo-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[llm]\necho = llm_echo_test\n")
    return site


def _env(echo_site: Path, user: Path, *first: Path) -> dict[str, str]:
    return {**os.environ, "LLM_USER_PATH": str(user), "LLM_LOAD_PLUGINS": "llm-echo-test",
            "PYTHONPATH": os.pathsep.join([*map(str, first), str(echo_site), SRC])}


def _llm(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "llm", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _import(path: Path, db: Path) -> dict:
    from openpto.integrations.llm_logs import import_llm_logs
    from openpto.store import Store

    return import_llm_logs(path, Store(db)).to_dict()


def _prompts(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT source, model, prompt, response, tokens_in, tokens_out, "
                            "conversation_id FROM prompts ORDER BY id").fetchall()


def test_logs_import_from_the_threads_schema_is_idempotent(echo_site: Path,
                                                          tmp_path: Path) -> None:
    env = _env(echo_site, tmp_path / "llm")
    assert _llm(env, "-m", "echo-test", "one two three") == "one two three\n"
    _llm(env, "-c", "four five")
    _llm(env, "-m", "echo-test", "--no-stream", "six")
    logs = tmp_path / "llm" / "logs.db"
    with sqlite3.connect(logs) as conn:
        assert conn.execute("SELECT count(*) FROM turns").fetchone() == (3,)
        assert conn.execute("SELECT count(*) FROM responses").fetchone() == (0,)
    db = tmp_path / "opt.db"
    result = _import(logs, db)
    assert result["imported"] == 3 and result["schemas"] == ["responses", "threads"]
    rows = _prompts(db)
    assert [r[:6] for r in rows] == [("llm", "echo-test", "one two three", "one two three", 3, 3),
                                     ("llm", "echo-test", "four five", "four five", 2, 2),
                                     ("llm", "echo-test", "six", "six", 1, 1)]
    assert rows[0][6] == rows[1][6] != rows[2][6]  # -c continued the first conversation
    assert _import(logs, db)["imported"] == 0 and len(_prompts(db)) == 3
    _llm(env, "-m", "echo-test", "seven")
    assert _import(logs, db)["imported"] == 1 and len(_prompts(db)) == 4


def test_logs_import_from_the_legacy_responses_table(echo_site: Path, tmp_path: Path) -> None:
    if not (legacy_llm() / "llm" / "__init__.py").is_file():
        pytest.skip(f"llm 0.31 is not in {legacy_llm()} (make install puts it there)")
    old = _env(echo_site, tmp_path / "llm", legacy_llm())
    assert _llm(old, "--version").strip().endswith("0.31")
    _llm(old, "-m", "echo-test", "alpha beta")
    _llm(old, "-c", "gamma")
    logs = tmp_path / "llm" / "logs.db"
    with sqlite3.connect(logs) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "responses" in tables and "turns" not in tables
    db = tmp_path / "opt.db"
    assert _import(logs, db) == {"path": str(logs), "imported": 2, "seen": 2,
                                 "schemas": ["responses"]}
    rows = _prompts(db)
    assert [r[:4] for r in rows] == [("llm", "echo-test", "alpha beta", "alpha beta"),
                                     ("llm", "echo-test", "gamma", "gamma")]
    assert rows[0][6] == rows[1][6]
    # The current llm migrates the same file and logs in the new tables: both are read, once.
    _llm(_env(echo_site, tmp_path / "llm"), "-m", "echo-test", "delta")
    again = _import(logs, db)
    assert again["imported"] == 1 and again["seen"] == 3
    assert again["schemas"] == ["responses", "threads"]
    assert [r[2] for r in _prompts(db)] == ["alpha beta", "gamma", "delta"]


def test_logs_import_refuses_what_is_not_an_llm_log(tmp_path: Path) -> None:
    from openpto.errors import CorruptFile, UsageError

    db = tmp_path / "opt.db"
    with pytest.raises(UsageError, match="no llm log at"):
        _import(tmp_path / "missing.db", db)
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(CorruptFile, match="not an llm log database"):
        _import(tmp_path / "junk.db", db)
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(CorruptFile, match="neither llm's responses table nor its turns"):
        _import(tmp_path / "other.db", db)


def _opt(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "openpto", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def test_opt_llm_prompt_logs_like_llm_and_logs_import_reads_it(echo_site: Path,
                                                               tmp_path: Path) -> None:
    env = {**_env(echo_site, tmp_path / "llm"), "OPT_DB": str(tmp_path / "opt.db")}
    done = _opt(env, "llm", "prompt", "hello there", "-m", "echo-test")
    assert (done.returncode, done.stdout) == (0, "hello there\n"), done.stderr
    done = _opt(env, "llm", "prompt", "bye", "-m", "echo-test", "--json")
    reply = json.loads(done.stdout)
    assert reply["response"] == "bye" and reply["output_tokens"] == 1
    done = _opt(env, "llm", "logs", "import", "--json")
    assert json.loads(done.stdout)["imported"] == 2
    assert [r[2] for r in _prompts(tmp_path / "opt.db")] == ["hello there", "bye"]
    done = _opt(env, "llm", "prompt", "x", "-m", "no-such-model")
    assert done.returncode == 2 and done.stderr == \
        "error: Unknown model: no-such-model (see: llm models)\n"
    done = _opt(env, "llm", "prompt", "x", "-m", "echo-test", "-o", "nokey")
    assert done.returncode == 2 and "KEY=VALUE" in done.stderr
    done = _opt(env, "llm", "plugins", "--json")
    assert "llm-echo-test" in [p["name"] for p in json.loads(done.stdout)["plugins"]]


def test_opt_llm_cmd_never_runs_without_a_yes(echo_site: Path, tmp_path: Path) -> None:
    from openpto.integrations.llm_commands import clean_command, needs_shell, run_drafted

    env = _env(echo_site, tmp_path / "llm")
    marker = tmp_path / "ran"
    description = f"touch {marker}"
    # The echo model drafts the description itself; with --json or without a terminal, it is
    # printed and not run.
    done = _opt(env, "llm", "cmd", description, "-m", "echo-test", "--json", stdin="y\n")
    assert json.loads(done.stdout) == {"description": description, "command": description,
                                       "ran": False, "returncode": None,
                                       "reason": "not interactive: not run"}
    done = _opt(env, "llm", "cmd", description, "-m", "echo-test", stdin="y\n")
    assert done.returncode == 0 and done.stdout == description + "\n"
    assert "not interactive" in done.stderr and not marker.exists()

    command = f"{sys.executable} -c \"open('{marker}', 'w').write('yes')\""
    declined = run_drafted("d", command, interactive=True, confirm=lambda c: False)
    assert (declined.ran, declined.reason, marker.exists()) == (False, "declined", False)
    ran = run_drafted("d", command, interactive=True, confirm=lambda c: c == command)
    assert (ran.ran, ran.returncode, marker.read_text()) == (True, 0, "yes")
    # Shell syntax is never handed to a shell, nor run without one.
    for text in ("ls | head", "echo $HOME", "rm *.txt", "a && b", "cat < x", "echo 'open"):
        assert needs_shell(text), text
        assert run_drafted("d", text, interactive=True, confirm=lambda c: True).ran is False
    assert not needs_shell("ls -la 'my folder'")
    assert clean_command("```bash\nls -la\n```") == "ls -la"
    assert clean_command("`du -sh .`") == "du -sh ."


def test_opt_llm_without_llm_installed_names_the_extra(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker" / "llm"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named llm')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), SRC])}
    for args in (["llm", "plugins"], ["llm", "prompt", "hi"], ["llm", "cmd", "list files"]):
        done = _opt(env, *args)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr == ("error: llm is needed for opt llm but is not installed: "
                               "pip install 'openpto[llm]'\n")
