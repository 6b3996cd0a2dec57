"""Architecture adapters: what the toolkit needs to know about a model family, written once.

Each supported ``model_type`` has a module ``openpto.models.adapters.<model_type>`` exporting
``ARCHITECTURE``, an ``Architecture`` (mlx-lm's convention: one module per model type, found by
name). Calibration asks it for the decoder layers, AWQ for the Linears that share an input and the
ops whose output channels can absorb a scale, GGUF export for llama.cpp's architecture name, its
metadata and the tensor transforms it expects, and ``self:layers=K`` drafts for the final norm.

This module sits beside ``registry.py`` so that ``openpto.core``, ``openpto.models`` and
``openpto.pipeline`` can all use it; the per-architecture modules are imported only by name, when a
model of that type is at hand. ``import openpto.architectures`` imports no torch.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from openpto.errors import UnsupportedModel

if TYPE_CHECKING:
    from torch import nn

#: the package whose modules are named after the model types they describe
ADAPTERS_PACKAGE = "openpto.models.adapters"

#: a fused Linear (names relative to a decoder layer) -> its parts in output-row order, with the
#: number of rows of each, from the model config (``{"self_attn.qkv_proj": {"q": 3072, ...}}``)
FusedRows = Callable[[Any], Mapping[str, Mapping[str, int]]]


@dataclass(frozen=True)
class ScalePair:
    """An op whose output channels are exactly the inputs of ``linears`` (names relative to a
    decoder layer): AWQ divides those channels by a scale and multiplies the Linears' input
    columns by it, which leaves the layer's function unchanged.

    ``prev`` is a norm (its weight is per channel) or a Linear (its output rows are the
    channels); ``prev_part`` names the rows of a fused Linear that are the channels (the ``v``
    rows of ``qkv_proj``, the ``up`` rows of ``gate_up_proj``). ``attention`` names the attention
    module when ``prev`` is a value projection feeding the output projection under grouped-query
    attention: each value channel then feeds one channel of every query head of its group.
    """

    prev: str
    linears: tuple[str, ...]
    prev_part: str | None = None
    attention: str | None = None


@dataclass(frozen=True)
class GGUFLayout:
    """How llama.cpp stores this architecture. Tensor names come from ``gguf``'s own
    ``TensorNameMap`` for ``arch``, so they follow the installed ``gguf`` package."""

    arch: str  # llama.cpp's architecture name (``gguf.MODEL_ARCH_NAMES``)
    # llama.cpp's "llama" architecture applies rotary embeddings to interleaved pairs; Hugging
    # Face's Llama rotates halves, so the converter permutes the q/k rows of each head.
    permute_qk: bool = False
    # Hugging Face tensors llama.cpp does not store (e.g. Gemma 2 always reuses the embedding).
    skip: tuple[str, ...] = ()
    # Architecture keys beyond the common ones: ``(writer, config.json dict) -> None``.
    metadata: Callable[[Any, dict[str, Any]], None] | None = None


@dataclass(frozen=True)
class Architecture:
    model_type: str
    # Linears of one decoder layer that read the very same tensor, each group in call order.
    input_groups: tuple[tuple[str, ...], ...]
    scale_pairs: tuple[ScalePair, ...]
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    # The RMSNorms compute ``x_hat * (norm_offset + weight)``: Gemma's hold ``weight - 1``.
    norm_offset: float = 0.0
    # AutoAWQ leaves q/k unclipped: their output error is a poor proxy for the attention scores.
    no_clip: tuple[str, ...] = ()
    fused_rows: FusedRows | None = None
    gguf: GGUFLayout | None = None

    def decoder_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        """The decoder layer list and its module path."""
        from torch import nn

        try:
            layers = model.get_submodule(self.layers)
        except AttributeError as exc:
            raise UnsupportedModel(
                f"{type(model).__name__} ({self.model_type}) has no decoder layers at "
                f"{self.layers}"
            ) from exc
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UnsupportedModel(f"{type(model).__name__}.{self.layers} is no list of layers")
        return self.layers, layers

    def rows(self, config: Any, linear: str, part: str) -> slice:
        """The output rows of ``part`` of the fused Linear ``linear``."""
        parts = (self.fused_rows(config) if self.fused_rows else {}).get(linear)
        if not parts or part not in parts:
            raise UnsupportedModel(f"{self.model_type}: {linear} has no fused part {part!r}")
        start = 0
        for name, count in parts.items():
            if name == part:
                return slice(start, start + count)
            start += count
        raise AssertionError("unreachable")


@functools.lru_cache(maxsize=1)
def supported_model_types() -> tuple[str, ...]:
    """Every model type with an adapter module, sorted."""
    package = importlib.import_module(ADAPTERS_PACKAGE)
    return tuple(sorted(
        info.name for info in pkgutil.iter_modules(package.__path__) if not info.ispkg
    ))


def architecture(model_type: str | None) -> Architecture:
    """The adapter of ``model_type``, or one ``UnsupportedModel`` naming the supported types."""
    supported = supported_model_types()
    if model_type not in supported:
        raise UnsupportedModel(
            f"no architecture adapter for model type {model_type!r} "
            f"(supported: {', '.join(supported)})"
        )
    module = importlib.import_module(f"{ADAPTERS_PACKAGE}.{model_type}")
    found = getattr(module, "ARCHITECTURE", None)
    if not isinstance(found, Architecture) or found.model_type != model_type:
        raise UnsupportedModel(f"{module.__name__} does not export an ARCHITECTURE for "
                               f"{model_type!r}")
    return found


def architecture_of(model: Any) -> Architecture:
    """The adapter of a loaded model, by its ``config.model_type``."""
    return architecture(getattr(getattr(model, "config", None), "model_type", None))
