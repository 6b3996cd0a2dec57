"""Pruning: magnitude, Wanda and SparseGPT (unstructured and N:M), and the joint sparse +
quantized mode of SparseGPT. ``openpto.default_plugins.methods`` registers their transform."""

from openpto.core.sparsity.configs import (
    MagnitudeConfig,
    SparseGPTConfig,
    SparsityConfig,
    WandaConfig,
    parse_pattern,
)
from openpto.core.sparsity.masks import layer_mask, nm_compliant, nm_mask, row_mask
from openpto.core.sparsity.metrics import SparsitySummary, speedup_bounds, summarize
from openpto.core.sparsity.sparsegpt import SparseGPTResult, sparsegpt
from openpto.core.sparsity.transforms import sparsify_model

__all__ = [
    "MagnitudeConfig",
    "SparseGPTConfig",
    "SparseGPTResult",
    "SparsityConfig",
    "SparsitySummary",
    "WandaConfig",
    "layer_mask",
    "nm_compliant",
    "nm_mask",
    "parse_pattern",
    "row_mask",
    "sparsegpt",
    "sparsify_model",
    "speedup_bounds",
    "summarize",
]
