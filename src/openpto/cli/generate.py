"""``opt generate``: text from one prompt, streamed to the terminal."""

from __future__ import annotations

import sys

import typer

from openpto.cli.common import (
    JSON_HELP,
    ProgressMode,
    ProgressOption,
    RichProgress,
    command_help,
    emit,
    progress_for,
)

MODEL_HELP = "Alias, folder, .gguf file, artifact or cached hub id (default smollm2-135m)."


def register(app: typer.Typer) -> None:
    app.command("generate", help=command_help(generate_cmd))(generate_cmd)


def write_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate_cmd(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    max_new_tokens: int = typer.Option(128, help="At most this many new tokens."),
    temperature: float = typer.Option(0.0, help="0 is greedy; higher is more random."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass in (0, 1]; 1 is off."),
    top_k: int = typer.Option(0, help="Keep the K most likely tokens; 0 is off."),
    min_p: float = typer.Option(0.0, help="Drop tokens below min_p x the top probability."),
    repetition_penalty: float = typer.Option(1.0, help="CTRL penalty on seen tokens; 1 is off."),
    seed: int | None = typer.Option(None, help="Seed for reproducible sampling."),
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print text as it comes."),
    chat: bool = typer.Option(True, "--chat/--raw", help="Use the tokenizer's chat template."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or mps."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    backend: str = typer.Option("torch", help="Generation engine: torch, llamacpp or mlx."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    progress: ProgressOption = ProgressMode.rich,
) -> None:
    """Generate text from a prompt and stream it to the terminal.

    Greedy by default (--temperature 0); the run, tokens/s (generated tokens over wall time,
    prefill included) and time to first token are recorded in the run database.

    --backend llamacpp or mlx streams from that engine instead of torch (same sampling options).

    Example: opt generate smollm2-135m --prompt "Write a haiku about tea." --max-new-tokens 48
    """
    from openpto.pipeline.generate import GenerationConfig, generate

    config = GenerationConfig(
        prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
        stop=tuple(stop or ()), chat=chat, device=device, dtype=dtype, backend=backend)
    live = stream and not as_json
    records = generate(model, config, progress=progress_for(progress))
    for record in records:
        if live and record.text:
            write_text(record.text)
    result = records.result()
    if live:
        write_text("\n")
        RichProgress(progress == ProgressMode.rich).log(
            f"{result.tokens} tokens, {result.tokens_per_second:.1f} tokens/s, "
            f"run {result.run_id}")
    elif as_json:
        emit(result.to_dict(), True)
    else:
        write_text(result.text + "\n")
