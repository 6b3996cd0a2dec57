"""``opt sparsify``: prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M)."""

from __future__ import annotations

from typing import Any

import typer

from openpto.cli.common import (
    JSON_HELP,
    ProgressMode,
    ProgressOption,
    command_help,
    emit,
    progress_for,
)
from openpto.cli.method_config import (
    config_file_option,
    data_options,
    resolve_config,
    set_option,
    show_config,
    show_option,
)

MODEL_HELP = "Alias, folder, .gguf file, artifact or cached hub id (default smollm2-135m)."
CALIB_HELP = (
    "Calibration text: file, folder, .jsonl, built-in corpus or data set (default pydoc-topics)."
)
EVAL_HELP = "Also measure perplexity on this text before and after pruning."
SPARSE_FORMAT_HELP = (
    "compressed: compressed-tensors' bitmask layout, smaller on disk, read by opt and "
    "compressed-tensors<=0.14. dense: the pruned weights stored as they are, a folder "
    "transformers and vLLM read as is."
)


def register(app: typer.Typer) -> None:
    app.command("sparsify", help=command_help(sparsify_cmd))(sparsify_cmd)


def sparsify_cmd(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    method: str = typer.Option(
        ..., "--method", help="magnitude, wanda, sparsegpt, or a plugin's pruning method."),
    sparsity: float | None = typer.Option(None, help="Fraction of weights to zero (default 0.5)."),
    pattern: str | None = typer.Option(None, help="N:M: keep N of every M weights, e.g. 2:4."),
    bits: int | None = typer.Option(None, help="sparsegpt only: also quantize to this many bits."),
    group_size: int | None = typer.Option(
        None, help="With --bits: 32, 64 or 128 (default: per row)."
    ),
    sym: bool | None = typer.Option(None, "--sym/--asym",
                                    help="With --bits: symmetric grid (default asymmetric)."),
    calib: str | None = typer.Option(None, "--calib", help=CALIB_HELP),
    samples: int = typer.Option(128, help="Calibration windows."),
    calib_seq_len: int = typer.Option(512, help="Tokens per calibration window."),
    output: str | None = typer.Option(None, help="Artifact folder (default: under OPT_HOME)."),
    eval_text: str | None = typer.Option(None, "--eval", help=EVAL_HELP),
    device: str = typer.Option("cpu", help="Where each layer is processed: cpu, cuda, cuda:N."),
    float_dtype: str = typer.Option(
        "bfloat16", help="Storage of tensors that are not quantized: bfloat16, float16, "
        "float32, keep."),
    sparse_format: str = typer.Option("compressed", "--sparse-format", help=SPARSE_FORMAT_HELP),
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Print the planned artifact size, write nothing."),
    config_file: str | None = config_file_option(),
    sets: list[str] = set_option(),
    show: bool = show_option(),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    progress: ProgressOption = ProgressMode.rich,
) -> None:
    """Prune every Linear of the decoder layers and write an artifact whose zeros are the mask.

    Magnitude needs no data; Wanda and SparseGPT calibrate one decoder layer at a time. With
    --bits, SparseGPT prunes and quantizes in one pass. The sparsity reported is measured from
    the weights over the pruned Linears.

    --json keys: output, method, pattern, sparsity, target_sparsity, nm_compliant (for the
    requested N:M; null when unstructured), params_pruned, dense_bytes and sparse_bytes (bf16
    values; sparse_layout names the layout), speedup_bounds (theoretical compute- and
    memory-bound limits), seconds, size_bytes_after, run_id, and with --eval
    perplexity_before and perplexity_after. Per-layer sparsity is in the run's store metrics.
    With --dry-run nothing is pruned or written: size_bytes_after is the planned size, the
    sparsity and byte counts are the target's, and dry_run is true.

    --sparse-format compressed (the default) stores the pruned Linears as kept values plus a
    bitmask: smaller on disk, read by opt and compressed-tensors<=0.14 (plain transformers
    would load those Linears randomly initialised). --sparse-format dense stores them as they
    are, zeros included: a folder transformers and vLLM read as is.

    Every field of the method's config is reachable with --config FILE and --set FIELD=VALUE
    (applied after the flags, in that order); --show-config prints them.

    Example: opt sparsify smollm2-135m --method sparsegpt --pattern 2:4 --eval stdlib-docstrings
    """
    import openpto
    from openpto.api import method_config_type

    config_type = method_config_type(method, openpto.SparsityConfig, "pruning method")
    given = {"sparsity": sparsity, "pattern": pattern, "bits": bits, "group_size": group_size,
             "symmetric": sym}
    flags: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    config = resolve_config(config_type, flags, config_file, sets)
    if show:
        show_config(config, as_json)
        return
    options = openpto.SparsifyOptions(
        **data_options(calib, samples, calib_seq_len, eval_text),
        output=output, device=device, float_dtype=float_dtype, sparse_format=sparse_format,
        dry_run=dry_run,
    )
    result = openpto.sparsify(model, config, options, progress=progress_for(progress))
    emit(result.to_dict(), as_json, title="sparsify (dry run)" if dry_run else "sparsify")
