"""``opt quantize``: any registered quantization method (RTN/GPTQ/AWQ, or another backend's) ->
an artifact folder."""

from __future__ import annotations

from typing import Any

import typer

from openpto.cli.common import (
    JsonOption,
    ModelArgument,
    ProgressMode,
    ProgressOption,
    emit,
    progress_for,
)
from openpto.cli.method_config import (
    config_file_option,
    config_values,
    data_options,
    set_option,
    show_config,
    show_option,
)
from openpto.config import build
from openpto.errors import UsageError

METHOD_HELP = ("A registered quantization method: rtn, gptq, awq (torch), nf4/int8 "
               "(bitsandbytes), or a plugin's. --show-config lists its fields.")
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
    "lower perplexity) or not. Same as --set float_targets=true|false."
)
FLOAT_DTYPE_HELP = "Storage of tensors that are not quantized: bfloat16, float16, float32, keep."


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
    model: ModelArgument = None,
    method: str = typer.Option("gptq", help=METHOD_HELP),
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
    float_dtype: str = typer.Option("bfloat16", help=FLOAT_DTYPE_HELP),
    config_file: str | None = config_file_option(),
    sets: list[str] = set_option(),
    show: bool = show_option(),
    as_json: JsonOption = False,
    progress: ProgressOption = ProgressMode.rich,
) -> None:
    """Quantize a model's weights and write an artifact folder (compressed-tensors packed).

    Every field of the method's config is reachable with --config FILE and --set FIELD=VALUE
    (applied after the flags, in that order); --show-config prints them.

    Example: opt quantize smollm2-135m --method gptq --group-size 64 --eval stdlib-docstrings
    """
    import openpto
    from openpto.api import method_config_type
    from openpto.pipeline.backends import get_backend

    config_type = method_config_type(method, openpto.QuantConfig, "quantization method")
    flags: dict[str, Any] = {"bits": bits, "group_size": _group(group_size)}
    if sym is not None:
        flags["symmetric"] = sym
    if float_targets is not None:  # sugar for --set float_targets=...
        flags["float_targets"] = float_targets
    values, _ = config_values(config_type, flags, config_file, sets)
    if "symmetric" not in values:
        # The grid's default symmetry is the backend's (symmetric at 8 bits for ours).
        values["symmetric"] = get_backend(backend).default_symmetric(values["bits"])
    config = build(config_type, values)
    if show:
        show_config(config, as_json)
        return
    options = openpto.QuantizeOptions(
        **data_options(calib, samples, calib_seq_len, eval_text),
        output=output, device=device, backend=backend, dry_run=dry_run, float_dtype=float_dtype,
    )
    result = openpto.quantize(model, config, options, progress=progress_for(progress))
    emit(result.to_dict(), as_json, title="quantize (dry run)" if dry_run else "quantize")
