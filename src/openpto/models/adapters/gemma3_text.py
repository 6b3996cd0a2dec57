"""Gemma 3 (the text model, ``Gemma3ForCausalLM``): Gemma 2's layer with per-head q/k norms,
local and global rotary bases, and no attention soft-capping."""

from __future__ import annotations

import dataclasses
from typing import Any

from openpto.architectures import GGUFLayout
from openpto.models.adapters import gemma2


def gguf_metadata(writer: Any, config: dict[str, Any]) -> None:
    """Final soft-capping and the sliding window, as llama.cpp's gemma3 reads them (it takes the
    local rotary base as fixed, the global one from ``rope.freq_base``)."""
    if config.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if "sliding_attention" in (config.get("layer_types") or []):
        writer.add_sliding_window(int(config["sliding_window"]))


# Gemma 2's modules, norms and AWQ pairs; its own GGUF name and keys, and an output tensor.
ARCHITECTURE = dataclasses.replace(
    gemma2.ARCHITECTURE, model_type="gemma3_text",
    gguf=GGUFLayout(arch="gemma3", metadata=gguf_metadata),
)
