from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openpto.store import Store
from tests.helpers import run_opt

SPEC_KEYS = {"perplexity", "tokens", "seq_len", "seconds", "run_id"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama and the tiny BPE tokenizer saved as a Hugging Face folder."""
    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    return save_model(tiny_llama(seed=5), tiny_tokenizer(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    from openpto.data import load_text

    path = tmp_path / "held-out.txt"
    path.write_text(load_text("stdlib-docstrings").text[:40_000], encoding="utf-8")
    return path


def _window_losses_perplexity(model, ids: list[int], seq_len: int) -> float:  # type: ignore[no-untyped-def]
    """The protocol written with plain transformers: mean of per-window ``labels=`` losses.

    Every window has seq_len - 1 scored tokens, so the mean of window means is the mean over
    all scored tokens.
    """
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            window = torch.tensor([ids[start : start + seq_len]])
            losses.append(float(model(window, labels=window).loss))
    return math.exp(sum(losses) / len(losses))


def test_eval_json_on_a_tiny_model(tiny_folder: Path, text_file: Path, tmp_db: Path,
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from openpto.models import load_model

    code, out, err = run_opt(
        ["eval", str(tiny_folder), "--text", str(text_file), "--seq-len", "64",
         "--max-tokens", "1000", "--batch-size", "4", "--json"], capsys, monkeypatch,
    )
    assert code == 0, err
    assert out.count("\n") == 1
    result = json.loads(out)
    assert set(result) >= SPEC_KEYS
    # 1000 tokens -> 15 windows of 64 (960 tokens), 40 dropped, 15 * 63 scored.
    assert (result["tokens"], result["scored_tokens"], result["windows"]) == (960, 945, 15)
    assert result["dropped_tokens"] == 40 and result["seq_len"] == 64
    loaded = load_model(str(tiny_folder))
    ids = loaded.tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"][:1000]
    expected = _window_losses_perplexity(loaded.model, ids, 64)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)

    store = Store()
    (run,) = store.rows("runs")
    assert (run["id"], run["kind"], run["status"]) == (result["run_id"], "eval", "succeeded")
    metrics = {m["name"]: m for m in store.rows("metrics")}
    assert metrics["perplexity"]["value"] == pytest.approx(result["perplexity"])
    details = json.loads(metrics["perplexity"]["details"])
    assert details["seq_len"] == 64 and details["windows"] == 15 and details["device"] == "cpu"
    assert details["dtype"] == "float32" and details["tokens"] == 960
    assert metrics["tokens"]["value"] == 960 and metrics["seconds"]["unit"] == "s"
    traces = [t["name"] for t in store.rows("traces")]
    assert traces == ["data", "load", "tokenize", "eval"]
    (dataset,) = store.rows("datasets")
    assert dataset["name"] == "held-out.txt" and dataset["tokens"] == len(
        loaded.tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    )
    assert json.loads(run["config"])["eval_data"]["id"] == dataset["id"]
    assert "perplexity" in err  # the progress bar is on stderr, never on stdout


def test_evaluate_library_call(tiny_folder: Path, tmp_path: Path) -> None:
    from openpto.pipeline.evaluate import EvalConfig, evaluate

    store = Store(tmp_path / "lib.db")
    result = evaluate(str(tiny_folder),
                      EvalConfig(text="pydoc-topics", seq_len=128, max_tokens=512),
                      store=store).to_dict()
    assert result["tokens"] == 512 and result["text"] == "pydoc-topics"
    assert store.rows("runs")[0]["model"] == str(tiny_folder)
    # A random 512-token model is close to uniform.
    assert 200 < result["perplexity"] < 1200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text", "{tmp}/missing.txt"], "no such file or folder"),
        (["--text", "{tmp}/empty.txt"], "is empty"),
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--max-tokens", "0"], "--max-tokens must be positive"),
        (["--text", "{tmp}/short.txt", "--seq-len", "512"], "fewer than one window of 512"),
    ],
)
def test_bad_input_fails_with_one_line_and_a_failed_run(
    args: list[str], message: str, tiny_folder: Path, tmp_path: Path, tmp_db: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "short.txt").write_text("only a few words")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run_opt(["eval", str(tiny_folder), *args, "--json"], capsys, monkeypatch)
    _assert_clean_failure(code, out, err, message)


def test_unknown_model_alias_fails_cleanly(tmp_db: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_opt(["eval", "no-such-model-alias", "--json"], capsys, monkeypatch)
    _assert_clean_failure(code, out, err, "is not a model alias")


def _assert_clean_failure(code: int, out: str, err: str, message: str) -> None:
    assert code != 0 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    (run,) = Store().rows("runs")
    assert run["kind"] == "eval" and run["status"] == "failed" and run["model"]
    assert message in run["error"].splitlines()[0]


def test_every_command_help_has_an_example() -> None:
    """Walks the registered Typer app, so commands added later are covered too."""
    import typer
    from typer.testing import CliRunner

    from openpto.cli.main import app

    def walk(command: object, path: list[str]) -> list[list[str]]:
        # Typer vendors its own click; a group is anything with a ``commands`` mapping.
        found = [path]
        for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
            found += walk(sub, [*path, name])
        return found

    paths = walk(typer.main.get_command(app), [])
    assert ["eval"] in paths and ["db", "serve"] in paths
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, (path, result.output)
        assert "Example" in result.output, f"opt {' '.join(path)} --help has no example"


@pytest.mark.integration
def test_eval_default_model_matches_plain_transformers(text_file: Path, tmp_db: Path) -> None:
    from openpto.models import load_model

    env = {**os.environ, "OPT_DB": str(tmp_db), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "openpto", "eval", "smollm2-135m", "--text", str(text_file),
         "--seq-len", "512", "--max-tokens", "4096", "--json"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) >= SPEC_KEYS
    assert result["tokens"] == 4096 and result["seq_len"] == 512

    loaded = load_model("smollm2-135m")
    ids = loaded.tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"][:4096]
    expected = _window_losses_perplexity(loaded.model, ids, 512)
    assert result["perplexity"] == pytest.approx(expected, rel=0.005)
    assert 5 < result["perplexity"] < 40  # a trained model, far from uniform (49152)

    store = Store(tmp_db)
    (run,) = store.rows("runs")
    assert run["id"] == result["run_id"] and run["status"] == "succeeded"
    assert run["model"] == "smollm2-135m"
    assert {m["name"] for m in store.rows("metrics")} >= {"perplexity", "tokens", "seconds"}
    assert {t["name"] for t in store.rows("traces")} >= {"load", "tokenize", "eval"}
