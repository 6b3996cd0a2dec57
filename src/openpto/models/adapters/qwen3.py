"""Qwen3: Qwen2 with per-head RMSNorms on q and k (after the projections, so AWQ's pairs are
Llama's) and an explicit head_dim."""

from __future__ import annotations

from openpto.architectures import Architecture, GGUFLayout
from openpto.models.adapters import llama

ARCHITECTURE = Architecture(
    model_type="qwen3",
    input_groups=llama.INPUT_GROUPS,
    scale_pairs=llama.scale_pairs(),
    no_clip=llama.ARCHITECTURE.no_clip,
    gguf=GGUFLayout(arch="qwen3"),
)
