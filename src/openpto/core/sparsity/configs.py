"""Frozen configs of the pruning methods; each is dispatched by type through ``TRANSFORMS``.

A config asks for either an unstructured ``sparsity`` (the fraction of weights set to zero) or an
N:M ``pattern``: at most N weights kept in every M consecutive weights along the input dimension
(NVIDIA's 2:4 keeps 2 of every 4). Giving neither means 50% unstructured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from openpto.config import MethodConfig, option
from openpto.core.quant.primitives import GROUP_SIZES, check_bits
from openpto.errors import ConfigError

DEFAULT_SPARSITY = 0.5
SCOPES = ("layer", "row")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: N kept out of every M, with ``1 <= N < M``."""
    parts = str(pattern).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}")
    n, m = (int(p) for p in parts)
    if n < 1 or n >= m:
        raise ConfigError(
            f"pattern {pattern}: N (weights kept per group) must be at least 1 and smaller than "
            f"M (the group size), got N={n}, M={m}"
        )
    return n, m


def check_sparsity(sparsity: float) -> None:
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not math.isfinite(sparsity)
        or not 0 < sparsity < 1
    ):
        raise ConfigError(f"sparsity must be a fraction strictly between 0 and 1, got {sparsity!r}")


def check_nm_width(width: int, pattern: tuple[int, int], where: str = "") -> None:
    n, m = pattern
    if width % m:
        at = f"{where}: " if where else ""
        raise ConfigError(
            f"{at}input width {width} is not divisible by M={m} of pattern {n}:{m}"
        )


@dataclass(frozen=True)
class SparsityConfig(MethodConfig):
    """What every pruning method shares: how much to prune, unstructured or N:M."""

    sparsity: float | None = option(
        None, "fraction of weights set to zero, strictly between 0 and 1 (default 0.5 when no "
        "pattern is given)")
    pattern: str | None = option(
        None, "N:M: keep at most N of every M consecutive weights along the input (e.g. 2:4)")

    def __post_init__(self) -> None:
        if self.pattern is not None and self.sparsity is not None:
            raise ConfigError("give either a sparsity or an N:M pattern, not both")
        if self.pattern is not None:
            parse_pattern(self.pattern)
        elif self.sparsity is None:
            object.__setattr__(self, "sparsity", DEFAULT_SPARSITY)
        else:
            check_sparsity(self.sparsity)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern) if self.pattern is not None else None

    @property
    def target_sparsity(self) -> float:
        """The fraction of zeros asked for (``1 - N/M`` for a pattern)."""
        if self.nm is not None:
            n, m = self.nm
            return 1 - n / m
        assert self.sparsity is not None
        return float(self.sparsity)

    @property
    def label(self) -> str:
        """``"2:4"`` or ``"unstructured"``: what goes in the pattern column of reports."""
        return self.pattern if self.pattern is not None else "unstructured"


@dataclass(frozen=True)
class MagnitudeConfig(SparsityConfig):
    """Prune the smallest |w|: no calibration data. ``scope`` compares weights across the whole
    Linear (``"layer"``) or within each output row (``"row"``); N:M compares within each group."""

    type_name: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False
    scope: str = option("layer", "compare weights across the whole Linear (layer) or per row")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")


@dataclass(frozen=True)
class WandaConfig(SparsityConfig):
    """Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2``, compared within each output row
    (within each group of M for N:M); no weight update."""

    type_name: ClassVar[str] = "wanda"


@dataclass(frozen=True)
class SparseGPTConfig(SparsityConfig):
    """SparseGPT (Frantar & Alistarh 2023): adaptive mask selection per block of columns and OBS
    updates of the remaining weights. With ``bits`` set, each column is quantized right after it is
    pruned, in the same pass (GPTQ-style), giving a sparse and quantized weight."""

    type_name: ClassVar[str] = "sparsegpt"
    # Columns per lazy-update block; the unstructured mask is chosen once per block.
    block_size: int = option(
        128, "columns per lazy-update block (the unstructured mask is chosen once per block)")
    damp: float = option(0.01, "fraction of the mean Hessian diagonal added before Cholesky")
    bits: int | None = option(
        None, "also quantize each column right after pruning it, to this many bits (2 to 8)")
    group_size: int | None = option(
        None, "with bits: input columns per scale, 32, 64 or 128 (None: one per output row)")
    symmetric: bool = option(False, "with bits: symmetric grid (no zero point)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if self.bits is not None:
            check_bits(self.bits)
        if self.group_size is not None:
            if self.bits is None:
                raise ConfigError("group_size only applies with bits (joint sparse + quantized)")
            if self.group_size not in GROUP_SIZES:
                sizes = ", ".join(str(g) for g in GROUP_SIZES)
                raise ConfigError(
                    f"group size must be one of {sizes} or None (per-channel), "
                    f"got {self.group_size!r}"
                )
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            # The mask is chosen block by block, so a group of M must not straddle two blocks.
            raise ConfigError(
                f"pattern {self.pattern}: SparseGPT prunes blocks of {self.block_size} columns "
                f"(block_size), which M={nm[1]} does not divide; use an M that divides it"
            )
