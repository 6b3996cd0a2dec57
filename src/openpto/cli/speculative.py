"""``opt speculative``: speculative decoding with a draft, against the target alone."""

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
from openpto.cli.generate import (
    ChatOption,
    MaxNewTokensOption,
    SeedOption,
    TemperatureOption,
    TopKOption,
    TopPOption,
)

DRAFT_HELP = (
    "A MODEL sharing the tokenizer, self:int4, self:int8 (the target quantized by RTN on packed "
    "kernels), self:layers=K (early exit after K layers) or lookup[:N] (prompt n-gram lookup)."
)


def register(app: typer.Typer) -> None:
    app.command("speculative", help=command_help(speculative_cmd))(speculative_cmd)


def speculative_cmd(
    model: ModelArgument = None,
    draft: str = typer.Option(..., "--draft", help=DRAFT_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt text."),
    gamma: int = typer.Option(4, help="Draft tokens per verification step (the start value)."),
    adaptive: bool = typer.Option(True, "--adaptive/--fixed", help="Adapt gamma as it runs."),
    max_new_tokens: MaxNewTokensOption = 128,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    seed: SeedOption = None,
    chat: ChatOption = True,
    baseline: bool = typer.Option(True, help="Also time the target alone and compare."),
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    as_json: JsonOption = False,
    progress: ProgressOption = ProgressMode.rich,
) -> None:
    """Generate with a draft proposing tokens and the target verifying them in one pass.

    The output equals the target's own (greedy: the same tokens; sampling: the same
    distribution). Reports vLLM's draft_acceptance_rate and mean_acceptance_length, the
    acceptance per draft position, tokens/s against the target alone and whether the text is
    identical; all recorded in the run database.

    Example: opt speculative smollm2-135m --draft lookup --prompt "Repeat: the cat sat." --json
    """
    import openpto

    config = openpto.SpeculativeConfig(
        prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, seed=seed, chat=chat, device=device, dtype=dtype, draft=draft, gamma=gamma,
        adaptive=adaptive, baseline=baseline)
    result = openpto.speculative(model, config, progress=progress_for(progress))
    emit(result.to_dict(), as_json, title="speculative")
