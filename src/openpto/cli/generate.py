"""``opt generate``: text from one prompt, streamed to the terminal."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from openpto.cli.common import (
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelArgument,
    ProgressMode,
    ProgressOption,
    RichProgress,
    command_help,
    emit,
    progress_for,
)

# The sampling options of opt generate and opt speculative, declared once.
MaxNewTokensOption = Annotated[int, typer.Option(help="At most this many new tokens.")]
TemperatureOption = Annotated[float, typer.Option(help="0 is greedy; higher is more random.")]
TopPOption = Annotated[float, typer.Option(help="Nucleus sampling mass in (0, 1]; 1 is off.")]
TopKOption = Annotated[int, typer.Option(help="Keep the K most likely tokens; 0 is off.")]
SeedOption = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
ChatOption = Annotated[
    bool, typer.Option("--chat/--raw", help="Use the tokenizer's chat template.")
]


def register(app: typer.Typer) -> None:
    app.command("generate", help=command_help(generate_cmd))(generate_cmd)


def write_text(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def generate_cmd(
    model: ModelArgument = None,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    max_new_tokens: MaxNewTokensOption = 128,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    min_p: float = typer.Option(0.0, help="Drop tokens below min_p x the top probability."),
    repetition_penalty: float = typer.Option(1.0, help="CTRL penalty on seen tokens; 1 is off."),
    seed: SeedOption = None,
    stop: list[str] | None = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print text as it comes."),
    chat: ChatOption = True,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    backend: str = typer.Option("torch", help="Generation engine: torch, llamacpp or mlx."),
    as_json: JsonOption = False,
    progress: ProgressOption = ProgressMode.rich,
) -> None:
    """Generate text from a prompt and stream it to the terminal.

    Greedy by default (--temperature 0); the run, tokens/s (generated tokens over wall time,
    prefill included) and time to first token are recorded in the run database.

    --backend llamacpp or mlx streams from that engine instead of torch (same sampling options).

    Example: opt generate smollm2-135m --prompt "Write a haiku about tea." --max-new-tokens 48
    """
    import openpto

    config = openpto.GenerationConfig(
        prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
        stop=tuple(stop or ()), chat=chat, device=device, dtype=dtype, backend=backend)
    live = stream and not as_json
    records = openpto.generate(model, config, progress=progress_for(progress))
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
