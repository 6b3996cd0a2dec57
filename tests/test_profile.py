"""The profiler: its numbers against an independent stopwatch, its protocol, and the CLI."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from openpto.core.generate import generate_text
from openpto.core.sampling import SamplingParams
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


def test_decode_rate_agrees_with_a_stopwatch(model) -> None:  # type: ignore[no-untyped-def]
    prompt_len, gen_len = 32, 48
    prompt = torch.randint(8, 512, (prompt_len,), generator=torch.Generator().manual_seed(0))
    full = SamplingParams(max_tokens=gen_len)
    first = SamplingParams(max_tokens=1)

    def stopwatch(params: SamplingParams) -> float:
        start = time.perf_counter()
        generate_text(model, None, prompt, params, ignore_eos=True)
        return time.perf_counter() - start

    stopwatch(full)  # warm-up
    rates, profiled = [], []
    for _ in range(3):  # interleaved, so a burst of load on the shared CPU hits both
        totals = [stopwatch(full) for _ in range(3)]
        prefills = [stopwatch(first) for _ in range(3)]
        decode = statistics.median(totals) - statistics.median(prefills)
        rates.append((gen_len - 1) / decode)
        result = profile_generation(model, prompt_len=prompt_len, gen_len=gen_len, repeats=3,
                                    warmup=0)
        profiled.append(result.decode_tokens_per_second)
    watch, prof = statistics.median(rates), statistics.median(profiled)
    assert abs(prof - watch) / watch < 0.10, (prof, watch)


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


def test_batch_profile_counts_every_row(model) -> None:  # type: ignore[no-untyped-def]
    one = profile_generation(model, prompt_len=8, gen_len=6, batch=1, repeats=1, warmup=0)
    four = profile_generation(model, prompt_len=8, gen_len=6, batch=4, repeats=1, warmup=0)
    # Four rows per step cost less than four single-row steps: batching raises throughput.
    assert four.decode_tokens_per_second > one.decode_tokens_per_second


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
