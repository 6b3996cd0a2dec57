"""Checks over the package's own source: no code path that runs code from a file or a shell.

Each check walks the syntax tree of every module under ``src/openpto`` (comments and strings do
not count), and a second part checks the defaults that keep a server private: prompt logging
off, CORS off, no listening beyond loopback without a key.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

UNPICKLERS = ("dill", "cloudpickle", "joblib", "marshal", "shelve")
SRC = Path(__file__).resolve().parent.parent / "src" / "openpto"


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        yield str(path.relative_to(SRC.parent)), ast.parse(path.read_text(), str(path))


def _calls(tree: ast.AST) -> Iterator[ast.Call]:
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_the_checks_see_the_whole_package() -> None:
    names = [name for name, _ in _modules()]
    assert len(names) > 100 and "openpto/serving/deps.py" in names


def test_torch_load_always_has_weights_only() -> None:
    bad = [f"{name}:{call.lineno}" for name, tree in _modules() for call in _calls(tree)
           if _dotted(call.func) == "torch.load"
           and not _is_true(_keyword(call, "weights_only"))]
    assert bad == []


def test_nothing_unpickles() -> None:
    """pickle is imported at most for its exception class (to name a corrupt file)."""
    bad = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                bad += [f"{name}:{node.lineno} imports {m}" for m in modules
                        if m.split(".")[0] in UNPICKLERS]
                if isinstance(node, ast.ImportFrom) and node.module == "pickle":
                    bad.append(f"{name}:{node.lineno} from pickle import ...")
            if (isinstance(node, ast.Attribute) and _dotted(node.value) == "pickle"
                    and not node.attr.endswith("Error")):
                bad.append(f"{name}:{node.lineno} pickle.{node.attr}")
    assert bad == []


def test_no_remote_code_unless_asked() -> None:
    """No call passes trust_remote_code=True, and every parameter of that name defaults to False."""
    bad = [f"{name}:{call.lineno}" for name, tree in _modules() for call in _calls(tree)
           if _is_true(_keyword(call, "trust_remote_code"))]
    seen = 0
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and node.target.id == "trust_remote_code":
                seen += 1
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    bad.append(f"{name}:{node.lineno} field default")
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            args = node.args
            positional = args.posonlyargs + args.args
            defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]],
                                args.defaults, strict=True))
            defaults |= {a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
                         if d is not None}
            if "trust_remote_code" in defaults:
                seen += 1
                default = defaults["trust_remote_code"]
                if not (isinstance(default, ast.Constant) and default.value is False):
                    bad.append(f"{name}:{node.lineno} {node.name}")
    assert seen > 0 and bad == []


def test_no_shell_and_no_eval() -> None:
    bad = []
    for name, tree in _modules():
        for call in _calls(tree):
            function = _dotted(call.func)
            if _is_true(_keyword(call, "shell")):
                bad.append(f"{name}:{call.lineno} shell=True")
            if function in ("os.system", "os.popen", "eval", "exec", "compile"):
                bad.append(f"{name}:{call.lineno} {function}")
    assert bad == []


# -- private by default ---------------------------------------------------------------------------

def test_prompt_logging_is_off_by_default() -> None:
    pytest.importorskip("fastapi")
    from openpto.cli.serve import serve_cmd
    from openpto.serving.settings import ServerSettings

    assert ServerSettings().log_prompts is False
    assert inspect.signature(serve_cmd).parameters["log_prompts"].default.default is False


def test_cors_is_off_unless_origins_are_given() -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from openpto.engines.engine import EngineOptions, make_engine
    from openpto.serving.app import create_app
    from openpto.serving.settings import ServerSettings

    engine = make_engine("torch", "no-such-model-needed-for-cors", EngineOptions())
    preflight = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}
    plain = TestClient(create_app(ServerSettings(), engine, access_sink=None))
    reply = plain.options("/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in reply.headers
    assert "access-control-allow-origin" not in plain.get("/health", headers=preflight).headers
    allowed = TestClient(create_app(ServerSettings(cors_origins=("https://example.org",)), engine,
                                    access_sink=None))
    reply = allowed.options("/v1/completions", headers=preflight)
    assert reply.headers["access-control-allow-origin"] == "https://example.org"
    other = allowed.options("/v1/completions", headers={**preflight, "Origin": "https://evil.test"})
    assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("192.168.1.4", False),
    ("example.org", False)])
def test_which_hosts_are_loopback(host: str, loopback: bool) -> None:
    from openpto.cli.serve import is_loopback

    assert is_loopback(host) is loopback


def test_serve_refuses_a_public_address_without_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from openpto.cli.main import app

    monkeypatch.setenv("OPT_API_KEY", "")  # an empty key is no key
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code != 0
    assert "refusing to listen on 0.0.0.0 without an API key" in str(result.exception)


def test_check_bind_warns_when_told_to_serve_without_a_key(
        capsys: pytest.CaptureFixture[str]) -> None:
    from openpto.cli.serve import check_bind
    from openpto.errors import UsageError

    check_bind("127.0.0.1", None, False)
    check_bind("0.0.0.0", "a-key", False)
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="--insecure-no-auth"):
        check_bind("10.1.2.3", None, False)
    check_bind("10.1.2.3", None, True)
    assert "warning: serving on 10.1.2.3 with no API key" in capsys.readouterr().err


def test_the_key_can_come_from_a_file(tmp_path: Path) -> None:
    from openpto.cli.serve import read_key_file
    from openpto.errors import UsageError

    (tmp_path / "key").write_text("s3cret-from-a-file\n")
    assert read_key_file(tmp_path / "key") == "s3cret-from-a-file"
    assert read_key_file(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        read_key_file(tmp_path / "empty")
    with pytest.raises(UsageError, match="cannot read the API key file"):
        read_key_file(tmp_path / "missing")
