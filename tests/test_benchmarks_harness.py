"""The benchmark harness, and every benchmark script starting and describing itself."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402

#: scripts that need a package this environment may lack before they can parse arguments
NEEDS = {"llama_cpp_server.py": "llama_cpp"}


def test_time_calls_runs_warmup_then_enough_repeats() -> None:
    calls: list[int] = []
    timing = harness.time_calls(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and len(timing.seconds) == 4
    assert timing.min <= timing.median <= max(timing.seconds)
    # a time budget asks for more calls, a call cap stops them
    capped = harness.time_calls(lambda: None, repeats=1, warmup=0, min_seconds=60.0, max_calls=7)
    assert len(capped.seconds) == 7


def test_round_robin_times_every_variant_once_per_round() -> None:
    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    times = harness.time_round_robin(fns, repeats=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b"] * 3
    assert {name: len(t.seconds) for name, t in times.items()} == {"a": 3, "b": 3}


def test_percentile_is_nearest_rank() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert harness.percentile(values, 0.5) == 3.0
    assert harness.percentile(values, 0.95) == 5.0
    assert harness.percentile(values, 0.0) == 1.0


def test_stopwatch_fills_wall_and_cpu() -> None:
    with harness.stopwatch() as elapsed:
        sum(range(100_000))
    assert elapsed.wall > 0 and elapsed.cpu > 0 and len(elapsed.load_average) == 3


def test_model_shapes_are_llama3_8b() -> None:
    fused = harness.linear_shapes(harness.LLAMA3_8B, fused=True)
    assert [fused[k] for k in ("o", "qkv", "gate/up", "down")] == [
        (4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336)]
    assert harness.linear_shapes(harness.LLAMA3_8B)["k/v"] == (1024, 4096)
    assert harness.linear_shapes(harness.SMOLLM2_135M)["k/v"] == (192, 576)
    small = harness.llama3_8b(32, num_hidden_layers=2)
    assert (small["hidden_size"], small["intermediate_size"], small["vocab_size"]) == (
        128, 448, 4008)
    assert (small["num_attention_heads"], small["num_key_value_heads"]) == (8, 2)
    assert small["num_hidden_layers"] == 2 and harness.LLAMA3_8B["num_hidden_layers"] == 32


def test_markdown_table() -> None:
    table = harness.markdown_table(["a", "b"], [[1, "x"], [2.5, ""]])
    assert table == "| a | b |\n|---|---|\n| 1 | x |\n| 2.5 |  |"


def test_write_json_records_commit_command_date_machine(tmp_path: Path) -> None:
    path = harness.write_json(tmp_path / "out" / "r.json", {"rows": [1, 2]})
    data = json.loads(path.read_text())
    assert data["rows"] == [1, 2]
    run = data["run"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    expected = head.stdout.strip() if head.returncode == 0 else None
    assert run["commit"] == expected
    assert run["command"].startswith("python ") and run["date"].startswith("20")
    machine = run["machine"]
    assert machine["cpu"]["cores"]["logical"] >= 1
    assert machine["devices"][0]["type"] == "cpu" and len(machine["load_average"]) == 3


def test_machine_lock_excludes_another_holder(tmp_path: Path) -> None:
    lock = tmp_path / "bench.lock"
    with harness.machine_lock(str(lock)) as load, open(lock, "a") as other:
        assert len(load) == 3
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a") as other:  # released on exit
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "harness.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_every_script_imports_and_prints_help(script: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    if script.name in NEEDS:
        pytest.importorskip(NEEDS[script.name])
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # as `python script.py` would: dataclasses look their module up in sys.modules
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0
    assert out.getvalue().startswith("usage:")
