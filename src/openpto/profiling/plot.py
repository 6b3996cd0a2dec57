"""A PNG comparing profiled models: decode and prefill throughput, TTFT and peak memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openpto.errors import UsageError


def plot_bench(results: list[dict[str, Any]], path: Path) -> Path:
    """Four bar panels, one bar per model; the title states device, dtype and the protocol."""
    if path.suffix.lower() != ".png":
        raise UsageError(f"the plot is written as PNG; give a .png path, got {path}")
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's import
    import matplotlib.pyplot as plt

    names = [str(r["model"]) for r in results]
    panels = [
        ("decode_tokens_per_second", "decode tokens/s", 1.0),
        ("prefill_tokens_per_second", "prefill tokens/s", 1.0),
        ("ttft_ms", "TTFT (ms)", 1.0),
        ("peak_memory_bytes", "peak memory (MiB)", 1.0 / 2**20),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        values = [float(r[key]) * scale for r in results]
        bars = ax.bar(range(len(names)), values, color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(label)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    setup = results[0]["setup"]
    fig.suptitle(
        f"{setup['device']} {setup['dtype']}, prompt {setup['prompt_len']}, "
        f"gen {setup['gen_len']}, batch {setup['batch']}, median of {setup['repeats']} "
        f"(warm-up {setup['warmup']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
