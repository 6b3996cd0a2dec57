"""``opt generate --backend``: the same greedy text from the MLX engine as from torch, and a clear
one-line error for a backend whose package is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from openpto.cli.main import app as cli
from openpto.store import Store

MODEL = "tiny-folder"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The serving tests' well-separated tiny model: float32 kernels of two frameworks agree on
    # its greedy tokens.
    pytest.importorskip("fastapi")
    from tests.test_serving import chat_tokenizer, varied_tiny_model

    folder = tmp_path_factory.mktemp("generate") / MODEL
    varied_tiny_model().save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return folder


def _generate(folder: Path, backend: str, *extra: str) -> dict[str, object]:
    done = CliRunner().invoke(cli, ["generate", str(folder), "--backend", backend,
                                    "--max-new-tokens", "12", "--json", *extra])
    assert done.exit_code == 0, done.output
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("mode", [["--chat", "-p", "Tell me about lists"],
                                  ["--raw", "-p", "def f(x):"]])
def test_mlx_backend_gives_the_torch_greedy_text(tiny_folder: Path, tmp_db: Path,
                                                 mode: list[str]) -> None:
    pytest.importorskip("mlx_lm")
    torch_run = _generate(tiny_folder, "torch", *mode)
    mlx_run = _generate(tiny_folder, "mlx", *mode)
    assert mlx_run["text"] == torch_run["text"] and mlx_run["text"]
    assert mlx_run["tokens"] == torch_run["tokens"] == 12
    assert mlx_run["prompt_tokens"] == torch_run["prompt_tokens"]
    assert mlx_run["backend"] == "mlx" and float(str(mlx_run["tokens_per_second"])) > 0
    (run,) = Store(tmp_db).rows("runs", "id = ?", [mlx_run["run_id"]])
    assert run["status"] == "succeeded" and json.loads(run["config"])["backend"] == "mlx"


def test_missing_llamacpp_is_one_clear_line(tmp_path: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed")
    env = {**os.environ, "OPT_DB": str(tmp_path / "opt.db"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "openpto", "generate", "--backend", "llamacpp",
                           "-p", "hi", "--json"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: llama_cpp is needed for the llama.cpp backend but is not installed: "
        "pip install 'openpto[llamacpp]'"]


def test_unknown_backend_is_a_usage_error(tmp_db: Path) -> None:
    done = CliRunner().invoke(cli, ["generate", "--backend", "vllm", "-p", "hi"])
    assert done.exit_code != 0
    assert "vllm" in str(done.exception)


@pytest.mark.integration
def test_mlx_backend_on_the_default_model(tmp_db: Path) -> None:
    """The default GGUF through mlx-lm (its cached float conversion): torch's greedy answer.
    ``tokens`` is not compared: the torch path counts the end-of-sequence token, engines do not."""
    pytest.importorskip("mlx_lm")
    runs = []
    for backend in ("torch", "mlx"):
        done = CliRunner().invoke(cli, ["generate", "--backend", backend, "-p",
                                        "What is the capital of France?", "--max-new-tokens",
                                        "16", "--json"])
        assert done.exit_code == 0, done.output
        runs.append(json.loads(done.stdout))
    assert "Paris" in runs[0]["text"] and runs[1]["text"] == runs[0]["text"]
