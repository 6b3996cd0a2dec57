"""The profiler: its numbers against a clock driven by the model, its protocol, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from openpto.errors import UsageError
from openpto.profiling import kernel_summary, profile_generation
from openpto.profiling.measure import percentile
from tests.helpers import one_thread, tiny_llama, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():  # type: ignore[no-untyped-def]
    with one_thread():
        yield


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    # Big enough that a decode step (a few ms) dwarfs the timer and Python overhead per token.
    return tiny_llama(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=2)


class _ModelClock:
    """A clock that only the model moves: each forward call costs a known time per new position,
    so every number the profiler reports has an exact expected value (no wall-clock noise)."""

    def __init__(self, prefill_s_per_token: float, decode_s: float) -> None:
        self.now = 1000.0
        self.prefill_s_per_token = prefill_s_per_token
        self.decode_s = decode_s

    def perf_counter(self) -> float:
        return self.now

    def charge(self, module, args, kwargs) -> None:  # type: ignore[no-untyped-def]
        ids = kwargs.get("input_ids", args[0] if args else None)
        positions = int(ids.shape[-1])
        self.now += self.prefill_s_per_token * positions if positions > 1 else self.decode_s


@pytest.mark.parametrize("batch", [1, 3])
def test_profile_numbers_follow_the_model_clock_exactly(model, monkeypatch, batch) -> None:  # type: ignore[no-untyped-def]
    prompt_len, gen_len, repeats = 24, 10, 2
    clock = _ModelClock(prefill_s_per_token=0.002, decode_s=0.005)
    monkeypatch.setattr("openpto.core.steps.time", clock)
    hook = model.register_forward_pre_hook(clock.charge, with_kwargs=True)
    try:
        out = profile_generation(model, prompt_len=prompt_len, gen_len=gen_len, batch=batch,
                                 repeats=repeats, warmup=1).to_dict()
    finally:
        hook.remove()
    # The first token costs the prefill only; each later token one decode step.
    ttft = prompt_len * 0.002
    assert out["ttft_ms"] == pytest.approx(ttft * 1e3, rel=1e-9)
    assert out["tpot_ms"] == pytest.approx(5.0, rel=1e-9)
    assert out["decode_tokens_per_second"] == pytest.approx(batch / 0.005, rel=1e-9)
    assert out["prefill_tokens_per_second"] == pytest.approx(batch * prompt_len / ttft, rel=1e-9)
    for q in (50, 90, 99):
        assert out[f"itl_p{q}_ms"] == pytest.approx(5.0, rel=1e-9)
    assert out["spread"]["decode_tokens_per_second"] == pytest.approx([batch / 0.005] * 2)


def test_profile_result_states_its_protocol(model) -> None:  # type: ignore[no-untyped-def]
    result = profile_generation(model, prompt_len=16, gen_len=8, repeats=2, warmup=1)
    out = result.to_dict()
    assert out["device"] == "cpu" and out["dtype"] == "float32"
    assert out["kernels"] == {"dense-float32": 6 * 7 + 1}
    setup = out["setup"]
    assert (setup["warmup"], setup["repeats"], setup["synchronized"]) == (1, 2, True)
    assert out["spread"]["ttft_ms"][0] <= out["ttft_ms"] <= out["spread"]["ttft_ms"][1]
    assert out["itl_p50_ms"] <= out["itl_p90_ms"] <= out["itl_p99_ms"]
    assert out["prefill_tokens_per_second"] == pytest.approx(16 / (out["ttft_ms"] / 1e3), rel=0.5)
    assert out["peak_memory_bytes"] > 10 * 2**20
    assert out["memory"]["kind"] == "cpu_rss_peak_sampled_per_token"


def test_module_breakdown_names_modules() -> None:
    small = tiny_llama()
    result = profile_generation(small, prompt_len=8, gen_len=4, repeats=1, warmup=0, modules=True)
    assert result.module_times is not None
    names = {row["module"]: row for row in result.module_times}
    assert {"LlamaDecoderLayer", "LlamaAttention", "LlamaMLP", "Linear"} <= set(names)
    assert names["LlamaDecoderLayer"]["calls"] == 2 * 4  # two layers, four forward passes
    assert names["LlamaMLP"]["cpu_ms"] <= names["LlamaDecoderLayer"]["cpu_ms"]


def test_kernel_summary_reads_kernel_names() -> None:
    class Packed(torch.nn.Module):
        kernel_name = "packed-int4-cpu"

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Packed(), Packed())
    assert kernel_summary(model) == {"dense-float32": 1, "packed-int4-cpu": 2}


def test_percentile_matches_numpy() -> None:
    import numpy as np

    values = [3.0, 1.0, 7.0, 2.0, 9.0, 4.0]
    for q in (50, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_bad_profile_options() -> None:
    with pytest.raises(UsageError, match="gen_len"):
        profile_generation(tiny_llama(), gen_len=1)
    with pytest.raises(UsageError, match="repeats"):
        profile_generation(tiny_llama(), repeats=0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _opt(args: list[str]) -> tuple[int, str, str]:
    from openpto.cli.main import app

    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def test_cli_profile_and_bench(tiny_folder: Path, tmp_db: Path, tmp_path: Path) -> None:
    code, out, _ = _opt(["profile", str(tiny_folder), "--prompt-len", "8", "--gen-len", "4",
                         "--repeats", "1", "--json"])
    assert code == 0
    data = json.loads(out)
    for key in ("ttft_ms", "tpot_ms", "prefill_tokens_per_second", "decode_tokens_per_second",
                "peak_memory_bytes", "device", "run_id"):
        assert key in data
    plot = tmp_path / "bench.png"
    code, out, _ = _opt(["bench", str(tiny_folder), str(tiny_folder), "--prompt-len", "8",
                         "--gen-len", "4", "--repeats", "1", "--plot", str(plot), "--json"])
    assert code == 0
    bench = json.loads(out)
    assert len(bench["results"]) == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from openpto.store import Store

    store = Store()
    run = next(r for r in store.rows("runs") if r["id"] == bench["run_id"])
    assert run["kind"] == "bench" and run["status"] == "succeeded"
    names = [m["name"] for m in store.rows("metrics") if m["run_id"] == bench["run_id"]]
    assert names.count("decode_tokens_per_second") == 2
