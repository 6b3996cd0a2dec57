"""Phi-3: q/k/v fused into ``qkv_proj`` (rows q, then k, then v) and gate/up fused into
``gate_up_proj`` (rows gate, then up). AWQ scales the v rows against ``o_proj`` and the up rows
against ``down_proj``; llama.cpp's phi3 stores both fused Linears as they are."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from openpto.architectures import Architecture, GGUFLayout, ScalePair

QKV, GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"


def fused_rows(config: Any) -> Mapping[str, Mapping[str, int]]:
    heads = int(config.num_attention_heads)
    kv_heads = int(config.num_key_value_heads or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    ffn = int(config.intermediate_size)
    return {
        QKV: {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim},
        GATE_UP: {"gate": ffn, "up": ffn},
    }


def gguf_metadata(writer: Any, config: dict[str, Any]) -> None:
    """The original context length (long-context rope scaling starts there) and the sliding
    window (0 for none, which llama.cpp reads as Phi-4's full attention)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    original = rope.get("original_max_position_embeddings",
                        config.get("original_max_position_embeddings"))
    writer.add_rope_scaling_orig_ctx_len(int(original or config["max_position_embeddings"]))
    writer.add_sliding_window(int(config.get("sliding_window") or 0))


ARCHITECTURE = Architecture(
    model_type="phi3",
    input_groups=((QKV,), ("self_attn.o_proj",), (GATE_UP,), ("mlp.down_proj",)),
    scale_pairs=(
        ScalePair("input_layernorm", (QKV,)),
        ScalePair(QKV, ("self_attn.o_proj",), prev_part="v", attention="self_attn"),
        ScalePair("post_attention_layernorm", (GATE_UP,)),
        ScalePair(GATE_UP, ("mlp.down_proj",), prev_part="up"),
    ),
    # q and k share qkv_proj's rows with v; AutoAWQ's rule (no clipping for q/k) covers all three.
    no_clip=(QKV,),
    fused_rows=fused_rows,
    gguf=GGUFLayout(arch="phi3", metadata=gguf_metadata),
)
