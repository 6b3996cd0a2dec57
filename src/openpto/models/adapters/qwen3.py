"""Qwen3: Qwen2 with per-head RMSNorms on q and k (after the projections, so AWQ's pairs are
Llama's, as Qwen2's are) and an explicit head_dim."""

from __future__ import annotations

import dataclasses

from openpto.architectures import GGUFLayout
from openpto.models.adapters import qwen2

ARCHITECTURE = dataclasses.replace(
    qwen2.ARCHITECTURE, model_type="qwen3", gguf=GGUFLayout(arch="qwen3")
)
