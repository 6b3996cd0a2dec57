"""What pruning achieved, measured from the weights themselves, and what it could buy.

Sparsity is counted from exact zeros in the weights (never taken from the config), per Linear and
over all pruned Linears. Storage is counted for three layouts: dense, 2:4 semi-structured (the
kept half of the values plus a 2-bit position index per kept value, as cuSPARSELt and
compressed-tensors' ``sparse-24`` store it) and a bitmask (kept values plus one bit per weight,
compressed-tensors' ``sparse-bitmask``). The speed-up model gives the two bounds that bracket any
kernel: compute-bound (fewer multiply-adds) and memory-bound (fewer bytes of weight to read).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from openpto.core.calibrate import decoder_layers
from openpto.core.sparsity.masks import nm_compliant


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    out_features: int
    in_features: int
    zeros: int
    sparsity: float
    nm_compliant: bool | None  # None when no N:M pattern was asked for
    fits_2_4: bool  # every group of 4 along the input holds at most 2 non-zeros

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class SparsitySummary:
    layers: list[LayerSparsity]
    params: int  # weights of the pruned Linears
    zeros: int
    sparsity: float  # zeros / params over the pruned Linears
    nm_compliant: bool | None
    dense_bytes: int
    semi_structured_bytes: int | None  # only when every layer is 2:4 compliant
    bitmask_bytes: int

    @property
    def fits_2_4(self) -> bool:
        """Every layer holds at most 2 non-zeros in each group of 4 (whatever was asked for)."""
        return bool(self.layers) and all(layer.fits_2_4 for layer in self.layers)

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "layers"}
        if per_layer:
            data["layers"] = [asdict(layer) for layer in self.layers]
        return data


def layer_sparsity(
    name: str, weight: torch.Tensor, pattern: tuple[int, int] | None = None
) -> LayerSparsity:
    out_features, in_features = weight.shape
    zeros = int((weight == 0).sum())
    return LayerSparsity(
        name=name,
        out_features=int(out_features),
        in_features=int(in_features),
        zeros=zeros,
        sparsity=zeros / weight.numel(),
        nm_compliant=None if pattern is None else nm_compliant(weight, *pattern),
        fits_2_4=nm_compliant(weight, 2, 4),
    )


def semi_structured_bytes(numel: int, element_bytes: int = 2) -> int:
    """2:4 storage: half the values plus 2 bits of position per kept value."""
    kept = numel // 2
    return kept * element_bytes + (kept * 2 + 7) // 8


def bitmask_bytes(numel: int, nonzeros: int, element_bytes: int = 2) -> int:
    return nonzeros * element_bytes + (numel + 7) // 8


def summarize(
    weights: Iterable[tuple[str, torch.Tensor]],
    pattern: tuple[int, int] | None = None,
    element_bytes: int = 2,
) -> SparsitySummary:
    """Sparsity and storage of ``(name, weight)`` pairs; bytes assume ``element_bytes`` per value
    (2 for the bf16/fp16 weights a GPU serves)."""
    layers = [layer_sparsity(name, w, pattern) for name, w in weights]
    params = sum(layer.params for layer in layers)
    zeros = sum(layer.zeros for layer in layers)
    compliant = None if pattern is None else all(layer.nm_compliant for layer in layers)
    is_24 = bool(layers) and all(layer.fits_2_4 for layer in layers)
    return SparsitySummary(
        layers=layers,
        params=params,
        zeros=zeros,
        sparsity=zeros / params if params else 0.0,
        nm_compliant=compliant,
        dense_bytes=params * element_bytes,
        semi_structured_bytes=(
            sum(semi_structured_bytes(layer.params, element_bytes) for layer in layers)
            if is_24
            else None
        ),
        bitmask_bytes=sum(
            bitmask_bytes(layer.params, layer.params - layer.zeros, element_bytes)
            for layer in layers
        ),
    )


def decoder_weights(
    model: nn.Module, packed: Mapping[str, Any] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, float weight)`` of every Linear inside the decoder layers: the Linears
    ``opt sparsify`` prunes, so a measurement of a loaded artifact matches the one made when it
    was written.

    A module counts as a Linear when it has ``in_features`` and ``out_features``: plain
    ``nn.Linear`` and kernel wrappers that keep a dense ``weight`` (the 2:4 one) give that weight;
    packed Linears, whose weight exists only in a kernel's layout, give ``packed[name]``
    dequantized (a ``QuantizedWeight``, as the artifact stores it) and are skipped without it.
    """
    prefix, layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        for sub, module in layer.named_modules():
            out_f = getattr(module, "out_features", None)
            in_f = getattr(module, "in_features", None)
            if not isinstance(out_f, int) or not isinstance(in_f, int):
                continue
            name = f"{prefix}.{index}.{sub}"
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (out_f, in_f):
                yield name, weight.detach()
            elif packed is not None and name in packed:
                yield name, packed[name].dequantize()


def model_sparsity(
    model: nn.Module, packed: Mapping[str, Any] | None = None, element_bytes: int = 2
) -> SparsitySummary:
    """Sparsity of a whole model's decoder Linears, counted from the weights (``decoder_weights``).

    ``nm_compliant`` is checked for 4:8; each layer's ``fits_2_4`` answers 2:4 (a 2:4 weight is
    also 4:8 compliant, not the other way round)."""
    return summarize(decoder_weights(model, packed), (4, 8), element_bytes)


@dataclass(frozen=True)
class SpeedupBounds:
    """Upper bounds on the speed-up of one ``[out, in]`` Linear on ``tokens`` tokens."""

    tokens: int
    compute_bound: float  # dense FLOPs / sparse FLOPs (what a compute-bound kernel could gain)
    memory_bound: float  # dense bytes / sparse bytes moved (weights + activations)
    roofline: float | None  # predicted speed-up on a device of given peak FLOP/s and bandwidth
    note: str


def speedup_bounds(
    out_features: int,
    in_features: int,
    tokens: int,
    *,
    layout: str,
    sparsity: float = 0.5,
    element_bytes: int = 2,
    peak_flops: float | None = None,
    bandwidth: float | None = None,
) -> SpeedupBounds:
    """Theoretical speed-up of a sparse Linear over its dense twin.

    ``layout`` is ``"2:4"`` (sparse tensor cores: half the multiply-adds, values halved plus 2-bit
    indices) or ``"unstructured"`` (a bitmask layout; the compute bound assumes skipped zeros cost
    nothing, which no dense-tensor-core kernel achieves — it is an upper bound, not a forecast).
    With ``peak_flops`` and ``bandwidth`` (bytes/s), a roofline ``max(flops/peak, bytes/bw)``
    predicts the ratio for that device.
    """
    numel = out_features * in_features
    dense_flops = 2.0 * tokens * numel
    activations = tokens * (in_features + out_features) * element_bytes
    dense_bytes = numel * element_bytes + activations
    if layout == "2:4":
        density = 0.5
        weight_bytes = semi_structured_bytes(numel, element_bytes)
        note = "2:4 on sparse tensor cores: at most 2x in math, values + 2-bit indices in memory"
    elif layout == "unstructured":
        density = 1.0 - sparsity
        weight_bytes = bitmask_bytes(numel, round(numel * density), element_bytes)
        note = "unstructured bitmask: ideal skip-the-zeros compute bound, no such dense kernel"
    else:
        raise ValueError(f"layout must be '2:4' or 'unstructured', got {layout!r}")
    sparse_flops = dense_flops * density
    sparse_bytes = weight_bytes + activations
    roofline = None
    if peak_flops and bandwidth:
        dense_t = max(dense_flops / peak_flops, dense_bytes / bandwidth)
        sparse_t = max(sparse_flops / peak_flops, sparse_bytes / bandwidth)
        roofline = dense_t / sparse_t
    return SpeedupBounds(
        tokens=tokens,
        compute_bound=dense_flops / sparse_flops,
        memory_bound=dense_bytes / sparse_bytes,
        roofline=roofline,
        note=note,
    )
