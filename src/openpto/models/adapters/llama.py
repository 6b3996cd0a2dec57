"""Llama (and every model that keeps Llama's module names and layout)."""

from __future__ import annotations

from openpto.architectures import Architecture, GGUFLayout, ScalePair

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN = ("mlp.gate_proj", "mlp.up_proj")

#: Linears that share an input: q/k/v after the input norm, gate/up after the second norm
INPUT_GROUPS = (ATTENTION, ("self_attn.o_proj",), MLP_IN, ("mlp.down_proj",))


def scale_pairs(mlp_norm: str = "post_attention_layernorm") -> tuple[ScalePair, ...]:
    """The four AWQ pairs of a pre-norm decoder layer whose MLP reads ``mlp_norm``."""
    return (
        ScalePair("input_layernorm", ATTENTION),
        ScalePair("self_attn.v_proj", ("self_attn.o_proj",), attention="self_attn"),
        ScalePair(mlp_norm, MLP_IN),
        ScalePair("mlp.up_proj", ("mlp.down_proj",)),
    )


ARCHITECTURE = Architecture(
    model_type="llama",
    input_groups=INPUT_GROUPS,
    scale_pairs=scale_pairs(),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    gguf=GGUFLayout(arch="llama", permute_qk=True),
)
