"""compressed-tensors' sparse weight layouts: ``sparse-bitmask`` and ``sparse-24-bitmask``.

A pruned Linear's ``weight`` is replaced by tensors named after its module, exactly as
compressed-tensors' ``BitmaskCompressor`` and ``Sparse24BitMaskCompressor`` wrote them (the
compressors of compressed-tensors up to 0.14; later releases keep only their configs):

- ``sparse-bitmask`` (any pattern): ``shape`` (int64 ``[2]``), ``compressed`` (the kept values
  in row-major order, 1-D), ``bitmask`` (uint8 ``[rows, ceil(cols / 8)]``, bit ``j % 8`` of byte
  ``j // 8`` set where column ``j`` is kept, numpy's little bit order) and ``row_offsets``
  (int64 ``[rows]``, where each row starts in ``compressed``);
- ``sparse-24-bitmask`` (2:4): ``shape`` (int64 ``[2, 1]``), ``compressed`` (``[rows, cols/2]``:
  the two largest-magnitude entries of every group of four) and ``bitmask`` as above.

The config that says so is ``quantization_config.sparsity_config`` in ``config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPARSE_BITMASK = "sparse-bitmask"
SPARSE_24_BITMASK = "sparse-24-bitmask"
SPARSE_FORMATS = (SPARSE_BITMASK, SPARSE_24_BITMASK)
#: the tensors each layout stores in place of ``weight``
LEAVES = {
    SPARSE_BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
    SPARSE_24_BITMASK: ("shape", "compressed", "bitmask"),
}


def format_for(structure: str) -> str:
    """The layout for a sparsity structure: 2:4 has its own, everything else is a bitmask."""
    return SPARSE_24_BITMASK if structure == "2:4" else SPARSE_BITMASK


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    packed = np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little")
    return torch.from_numpy(packed)


def _unpack_bits(bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    unpacked = np.unpackbits(bits.cpu().numpy(), axis=-1, count=shape[-1], bitorder="little")
    return torch.from_numpy(unpacked.reshape(shape).astype(bool))


def keep_mask_24(weight: torch.Tensor) -> torch.Tensor:
    """The two largest-magnitude entries of every group of four along each row (ties as
    ``topk`` breaks them), the rule compressed-tensors' 2:4 compressor keeps."""
    groups = weight.reshape(-1, 4)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return mask.reshape(weight.shape)


def compress(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """A 2-D weight as the ``fmt`` layout's tensors (names without the module prefix)."""
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    if fmt == SPARSE_24_BITMASK:
        from openpto.core.sparsity.masks import nm_compliant

        if not nm_compliant(weight, 2, 4):
            raise ValueError("the weight is not 2:4 sparse (a group of 4 has more than 2 "
                             "non-zeros): store it as sparse-bitmask")
        mask = keep_mask_24(weight)
        return {
            "shape": torch.tensor([[rows], [cols]], dtype=torch.int64),
            "compressed": weight[mask].reshape(rows, cols // 2).contiguous(),
            "bitmask": _pack_bits(mask),
        }
    if fmt != SPARSE_BITMASK:
        raise ValueError(f"unknown sparse format {fmt!r} (known: {', '.join(SPARSE_FORMATS)})")
    mask = weight != 0
    counts = mask.sum(dim=1)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
        "compressed": weight[mask].contiguous(),
        "bitmask": _pack_bits(mask),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def decompress(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight back from either layout's tensors (values scattered where bits are set;
    both layouts keep values in row-major order)."""
    rows, cols = (int(v) for v in tensors["shape"].flatten().tolist())
    values = tensors["compressed"]
    mask = _unpack_bits(tensors["bitmask"], (rows, cols))
    dense = torch.zeros((rows, cols), dtype=values.dtype)
    dense[mask] = values.flatten().cpu()
    return dense


def planned_tensors(rows: int, cols: int, fmt: str, dtype: torch.dtype, sparsity: float
                    ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Leaf -> (dtype, shape) of one pruned weight in ``fmt``, before it is pruned: the kept
    count assumes ``sparsity`` of the entries are zero (2:4 always keeps half)."""
    bitmask = (torch.uint8, (rows, -(-cols // 8)))
    if fmt == SPARSE_24_BITMASK:
        return {"shape": (torch.int64, (2, 1)), "compressed": (dtype, (rows, cols // 2)),
                "bitmask": bitmask}
    kept = rows * cols - round(rows * cols * sparsity)
    return {"shape": (torch.int64, (2,)), "compressed": (dtype, (kept,)), "bitmask": bitmask,
            "row_offsets": (torch.int64, (rows,))}


def sparsity_config(fmt: str, structure: str, targets: Iterable[str], linears: Iterable[str],
                    sparsity: float) -> dict[str, Any]:
    """compressed-tensors' ``sparsity_config`` (its ``SparsityCompressionConfig`` fields):
    every Linear is targeted and those left dense are listed under ``ignore``."""
    return {
        "format": fmt,
        "targets": ["Linear"],
        "ignore": sorted(set(linears) - set(targets)),
        "global_sparsity": sparsity,
        "sparsity_structure": structure,
    }


def folder_sparsity_config(folder: Path) -> dict[str, Any] | None:
    """The ``sparsity_config`` of a folder's ``config.json`` when it stores compressed sparse
    weights (``sparse-bitmask`` or ``sparse-24-bitmask``), else ``None``."""
    config = json.loads((folder / "config.json").read_text())
    sparse = (config.get("quantization_config") or {}).get("sparsity_config") or {}
    return sparse if sparse.get("format") in SPARSE_FORMATS else None


def read_sparse_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every compressed weight of the folder, decompressed: ``module.weight`` -> dense tensor
    (in its stored dtype). Empty when the folder stores no compressed sparse weights."""
    from safetensors import safe_open

    from openpto.errors import CorruptFile

    sparse = folder_sparsity_config(folder)
    if sparse is None:
        return {}
    leaves = LEAVES[sparse["format"]]
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(k for k in keys if k.endswith(".bitmask")):
                module = key.removesuffix(".bitmask")
                missing = [leaf for leaf in leaves if f"{module}.{leaf}" not in keys]
                if missing:
                    raise CorruptFile(f"{file}: {module} lacks {', '.join(missing)} of the "
                                      f"{sparse['format']} layout")
                parts = {leaf: f.get_tensor(f"{module}.{leaf}") for leaf in leaves}
                out[f"{module}.weight"] = decompress(parts)
    if not out:
        raise CorruptFile(f"{folder} says {sparse['format']} but holds no bitmask tensors")
    return out


def is_sparse_leaf(key: str) -> bool:
    """Whether a tensor name is part of a compressed sparse weight (for readers of raw
    tensors that put the decompressed ``weight`` in its place)."""
    return key.rpartition(".")[2] in LEAVES[SPARSE_BITMASK]
