"""Pure mask primitives: which weights to keep, given a score per weight (higher = keep).

Every mask is a ``bool`` tensor of the weight's shape, ``True`` where the weight is kept. Counts
are exact — ties never change how many weights are pruned — so an N:M mask has exactly N kept in
every group and an unstructured mask prunes ``round(numel * sparsity)`` weights.
"""

from __future__ import annotations

import torch

from openpto.core.sparsity.configs import check_nm_width, check_sparsity


def prune_count(numel: int, sparsity: float) -> int:
    return round(numel * sparsity)


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest-scoring ``round(numel * sparsity)`` weights of the whole tensor."""
    check_sparsity(sparsity)
    flat = scores.reshape(-1)
    mask = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    k = prune_count(flat.numel(), sparsity)
    if k:
        mask[torch.topk(flat, k, largest=False, sorted=False).indices] = False
    return mask.reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest scores of each row of a 2-D tensor.

    ``round(rows * cols * sparsity)`` weights are pruned in all; when that is not a multiple of
    the row count, the first rows prune one more each, so the layer's sparsity is exact rather than
    off by up to half a weight per row (which, on narrow layers, is more than 0.1%).
    """
    check_sparsity(sparsity)
    rows, cols = scores.shape
    total = prune_count(rows * cols, sparsity)
    base, extra = divmod(total, rows)
    per_row = torch.full((rows, 1), base, dtype=torch.long, device=scores.device)
    per_row[:extra] += 1
    ranks = torch.empty_like(scores, dtype=torch.long)
    order = torch.argsort(scores, dim=1)
    ranks.scatter_(1, order, torch.arange(cols, device=scores.device).expand(rows, cols))
    return ranks >= per_row


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive entries along the last dim."""
    check_nm_width(scores.shape[-1], (n, m))
    groups = scores.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return keep.reshape(scores.shape)


def nm_compliant(weight_or_mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive entries along the last dim has at most ``n``
    non-zeros (``weight_or_mask`` may be a weight or a keep-mask)."""
    if weight_or_mask.shape[-1] % m:
        return False
    nonzero = (weight_or_mask != 0).reshape(-1, m).sum(dim=1)
    return bool((nonzero <= n).all())
