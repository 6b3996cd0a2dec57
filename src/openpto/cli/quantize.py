"""``opt quantize``: RTN/GPTQ/AWQ (or another backend) -> an artifact folder."""

from __future__ import annotations

import typer

from openpto.cli.common import JSON_HELP, ProgressMode, ProgressOption, emit, progress_for
from openpto.errors import UsageError

MODEL_HELP = "Alias, folder, .gguf file, artifact or cached hub id (default smollm2-135m)."
GROUP_HELP = (
    "Columns per scale: 32, 64, 128, or 'channel' (one per row). Default: per-channel for 8 bits, "
    "else the largest of 128/64/32 that divides every input width."
)
SYM_HELP = "Symmetric (no zero point) or asymmetric grid. Default: symmetric for 8 bits only."
CALIB_HELP = "Calibration text (file, folder, .jsonl, corpus name). Default: pydoc-topics."
EVAL_HELP = "Measure perplexity on this text before and after (e.g. stdlib-docstrings)."
BACKEND_HELP = "torch (ours), bitsandbytes, quanto or mlx (see opt info)."
FLOAT_TARGETS_HELP = (
    "GPTQ: fit each layer to the float model's outputs (default; about 2x the calibration time, "
    "lower perplexity) or not."
)


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_cmd)


def _group(value: str | None) -> int | str | None:
    if value is None:
        return "auto"
    if value.lower() in ("channel", "per-channel", "0"):
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise UsageError(f"--group-size {value!r} is not a number or 'channel'") from exc


def quantize_cmd(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    method: str = typer.Option("gptq", help="rtn, gptq or awq (nf4/int8 with bitsandbytes)."),
    bits: int = typer.Option(4, help="Bits per weight: 4 or 8 (2-8 with the torch backend)."),
    group_size: str | None = typer.Option(None, "--group-size", help=GROUP_HELP),
    sym: bool | None = typer.Option(None, "--sym/--asym", help=SYM_HELP),
    calib: str | None = typer.Option(None, "--calib", help=CALIB_HELP),
    samples: int = typer.Option(128, help="Calibration windows."),
    calib_seq_len: int = typer.Option(512, help="Tokens per calibration window."),
    output: str | None = typer.Option(None, help="Artifact folder (default under OPT_HOME)."),
    device: str = typer.Option("cpu", help="Where layers are calibrated: cpu, cuda, mps."),
    backend: str = typer.Option("torch", help=BACKEND_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the artifact size, do nothing."),
    eval_text: str | None = typer.Option(None, "--eval", help=EVAL_HELP),
    float_targets: bool | None = typer.Option(
        None, "--float-targets/--no-float-targets", help=FLOAT_TARGETS_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    progress: ProgressOption = ProgressMode.rich,
) -> None:
    """Quantize a model's weights and write an artifact folder (compressed-tensors packed).

    Example: opt quantize smollm2-135m --method gptq --group-size 64 --eval stdlib-docstrings
    """
    from openpto.pipeline.quantize import quantize_model

    result = quantize_model(
        model, method=method, bits=bits, group_size=_group(group_size), symmetric=sym,
        calib=calib, samples=samples, calib_seq_len=calib_seq_len, output=output, device=device,
        backend=backend, dry_run=dry_run, eval_text=eval_text, progress=progress_for(progress),
        float_targets=float_targets,
    )
    emit(result, as_json, title="quantize (dry run)" if dry_run else "quantize")
