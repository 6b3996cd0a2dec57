"""Gemma 2: four norms per layer (the MLP reads ``pre_feedforward_layernorm``; the two
``post_*`` norms scale the sublayer outputs), RMSNorms computing ``x_hat * (1 + weight)``, and a
head that always reuses the embedding."""

from __future__ import annotations

from typing import Any

from openpto.architectures import Architecture, GGUFLayout
from openpto.models.adapters import llama


def gguf_metadata(writer: Any, config: dict[str, Any]) -> None:
    """The soft-capping and sliding-window keys llama.cpp's gemma2 reads."""
    if config.get("attn_logit_softcapping") is not None:
        writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
    if config.get("final_logit_softcapping") is not None:
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if config.get("sliding_window") is not None:
        writer.add_sliding_window(int(config["sliding_window"]))


ARCHITECTURE = Architecture(
    model_type="gemma2",
    input_groups=llama.INPUT_GROUPS,
    scale_pairs=llama.scale_pairs(mlp_norm="pre_feedforward_layernorm"),
    norm_offset=1.0,
    no_clip=llama.ARCHITECTURE.no_clip,
    # llama.cpp's gemma2 has no output tensor: it always multiplies by the embedding.
    gguf=GGUFLayout(arch="gemma2", skip=("lm_head.weight",), metadata=gguf_metadata),
)
