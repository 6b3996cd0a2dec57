"""Qwen2: Llama's modules (q/k/v with biases); llama.cpp rotates halves (no q/k permutation)."""

from __future__ import annotations

from openpto.architectures import Architecture, GGUFLayout
from openpto.models.adapters import llama

ARCHITECTURE = Architecture(
    model_type="qwen2",
    input_groups=llama.INPUT_GROUPS,
    scale_pairs=llama.scale_pairs(),
    no_clip=llama.ARCHITECTURE.no_clip,
    gguf=GGUFLayout(arch="qwen2"),
)
