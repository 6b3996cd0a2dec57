"""``opt export``: an artifact folder -> GGUF, compressed-tensors or MLX."""

from __future__ import annotations

import typer

from openpto.cli.common import JSON_HELP, ProgressMode, ProgressOption, emit, progress_for

TYPE_HELP = (
    "GGUF tensor type: q8_0, q4_0, q4_1 or f16. Default: the type the artifact's grid maps onto "
    "exactly (4-bit group 32 -> q4_0 symmetric / q4_1 asymmetric), else q8_0."
)


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)


def export_cmd(
    artifact: str = typer.Argument(..., help="Artifact folder written by opt quantize."),
    fmt: str = typer.Option(..., "--format", help="gguf, compressed-tensors or mlx."),
    qtype: str | None = typer.Option(None, "--type", help=TYPE_HELP),
    output: str = typer.Option(..., help="Output file (gguf) or folder."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    progress: ProgressOption = ProgressMode.rich,
) -> None:
    """Export an artifact for llama.cpp/Ollama (GGUF), vLLM (compressed-tensors) or mlx-lm.

    Example: opt export ~/.openpto/artifacts/smollm2-135m-gptq-w4g32 --format gguf --output m.gguf
    """
    import openpto

    config = openpto.ExportConfig(format=fmt, output=output, type=qtype)
    result = openpto.export(artifact, config, progress=progress_for(progress))
    emit(result.to_dict(), as_json, title="export")
