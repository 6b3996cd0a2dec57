"""``opt profile`` and ``opt bench``: latency, throughput and memory of generation."""

from __future__ import annotations

from pathlib import Path

import typer

from openpto.cli.common import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelArgument,
    ProgressMode,
    ProgressOption,
    command_help,
    emit,
    progress_for,
)


def register(app: typer.Typer) -> None:
    app.command("profile", help=command_help(profile_cmd))(profile_cmd)
    app.command("bench", help=command_help(bench_cmd))(bench_cmd)


def profile_cmd(
    model: ModelArgument = None,
    prompt_len: int = typer.Option(128, help="Prompt tokens per row."),
    gen_len: int = typer.Option(128, help="Generated tokens per row (at least 2)."),
    batch: int = typer.Option(1, help="Rows generated together."),
    repeats: int = typer.Option(5, help="Timed runs."),
    warmup: int = typer.Option(1, help="Untimed runs first."),
    modules: bool = typer.Option(False, help="Add per-module times from torch.profiler."),
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    as_json: JsonOption = False,
    progress: ProgressOption = ProgressMode.rich,
) -> None:
    """Measure TTFT, TPOT, inter-token latency percentiles, prefill and decode tokens/s and peak
    memory of one model.

    Protocol: prompts of random token ids, greedy decoding with end-of-sequence ignored, warm-up
    runs, then timed repeats whose medians are reported with min/max; every token is timed after
    it reaches the host. Recorded in the run database with device, dtype and kernels.

    Example: opt profile smollm2-135m --prompt-len 128 --gen-len 128 --repeats 5 --json
    """
    import openpto

    config = openpto.ProfileConfig(prompt_len=prompt_len, gen_len=gen_len, batch=batch,
                                   repeats=repeats, warmup=warmup, modules=modules,
                                   device=device, dtype=dtype)
    result = openpto.profile(model, config, progress=progress_for(progress))
    emit(result.to_dict(), as_json, title="profile")


def bench_cmd(
    models: list[str] = typer.Argument(..., help="Models or artifacts to compare."),
    prompt_len: int = typer.Option(128, help="Prompt tokens per row."),
    gen_len: int = typer.Option(128, help="Generated tokens per row (at least 2)."),
    batch: int = typer.Option(1, help="Rows generated together."),
    repeats: int = typer.Option(5, help="Timed runs per model."),
    warmup: int = typer.Option(1, help="Untimed runs per model first."),
    plot: Path | None = typer.Option(None, help="Write a PNG comparing the models."),
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    as_json: JsonOption = False,
    progress: ProgressOption = ProgressMode.rich,
) -> None:
    """Profile several models or artifacts with one protocol, as a table and a PNG plot.

    Each model gets the `opt profile` measurements; everything is recorded in one bench run.

    Example: opt bench smollm2-135m ./artifacts/smollm2-int4 --gen-len 64 --plot bench.png
    """
    import openpto

    config = openpto.ProfileConfig(prompt_len=prompt_len, gen_len=gen_len, batch=batch,
                                   repeats=repeats, warmup=warmup, device=device, dtype=dtype)
    result = openpto.bench(models, config, plot=plot, progress=progress_for(progress)).to_dict()
    if as_json:
        emit(result, True)
        return
    from rich.console import Console
    from rich.table import Table

    keys = ("decode_tokens_per_second", "prefill_tokens_per_second", "ttft_ms", "tpot_ms",
            "peak_memory_bytes")
    table = Table("model", *keys, title=f"bench (run {result['run_id']})")
    for row in result["results"]:
        table.add_row(row["model"], *(f"{row[k]:.4g}" for k in keys))
    Console().print(table)
