"""``opt eval``: perplexity of a model on held-out text."""

from __future__ import annotations

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

TEXT_HELP = (
    "Text file, folder of .txt/.md, .jsonl, built-in corpus (stdlib-docstrings, pydoc-topics) "
    "or cached data set NAME[:CONFIG][:SPLIT]. Default: stdlib-docstrings."
)
MAX_TOKENS_HELP = "Score at most this many tokens from the start of the text (default: all)."


def register(app: typer.Typer) -> None:
    app.command("eval", help=command_help(eval_cmd))(eval_cmd)


def eval_cmd(
    model: ModelArgument = None,
    text: str | None = typer.Option(None, "--text", help=TEXT_HELP),
    text_field: str = typer.Option("text", help="Field with the text in JSONL or data set rows."),
    seq_len: int = typer.Option(512, help="Tokens per window (at least 2)."),
    max_tokens: int | None = typer.Option(None, help=MAX_TOKENS_HELP),
    batch_size: int = typer.Option(1, help="Windows per forward pass."),
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    as_json: JsonOption = False,
    progress: ProgressOption = ProgressMode.rich,
) -> None:
    """Measure a model's perplexity on text.

    Protocol: the whole text is tokenized once without special tokens, cut to the first
    --max-tokens tokens and split into non-overlapping windows of --seq-len tokens (an incomplete
    last window is dropped). In each window every token after the first is scored, so each token
    counts once; perplexity = exp(mean negative log-likelihood over the scored tokens), computed
    from float32 log-probabilities. The default text is the built-in corpus "stdlib-docstrings",
    which shares no text with the calibration default "pydoc-topics". The run, its metrics and
    the text's sha256 are recorded in the run database.

    Sparsity is measured on every model, pruned or not, from the weights of the Linears inside
    the decoder layers (the ones opt sparsify prunes; packed weights are read back from the
    artifact): "sparsity" (fraction of exact zeros), "nm_compliant" ({"2:4": ..., "4:8": ...}:
    at most N non-zeros in every M consecutive weights of every such Linear), "linear_params"
    and "nonzero_linear_params". The store keeps the per-layer values.

    --json keys: perplexity, tokens, scored_tokens, windows, dropped_tokens, seq_len, seconds,
    text, sparsity, nm_compliant, linear_params, nonzero_linear_params, run_id.

    Example: opt eval smollm2-135m --seq-len 512 --max-tokens 4096 --json
    """
    import openpto

    config = openpto.EvalConfig(text=text, seq_len=seq_len, max_tokens=max_tokens,
                                batch_size=batch_size, device=device, dtype=dtype,
                                text_field=text_field)
    result = openpto.evaluate(model, config, progress=progress_for(progress))
    emit(result.to_dict(), as_json, title="eval")
