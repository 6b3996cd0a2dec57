"""Frozen configs of the quantization methods; each is dispatched by type through ``TRANSFORMS``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from openpto.config import MethodConfig
from openpto.core.quant.primitives import GROUP_SIZES, check_bits
from openpto.errors import ConfigError


def _check_group(group_size: int | None) -> None:
    if group_size is not None and group_size not in GROUP_SIZES:
        sizes = ", ".join(str(g) for g in GROUP_SIZES)
        raise ConfigError(
            f"group size must be one of {sizes} or None (per-channel), got {group_size!r}"
        )


@dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """What every weight-only quantization method shares: the integer grid."""

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_group(self.group_size)


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest with min/max scales: no calibration data."""

    type_name: ClassVar[str] = "rtn"
    # INT8 per-channel symmetric is the near-lossless default; INT4 wants groups.
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ (Frantar et al. 2022): error-compensating rounding driven by the layer Hessian."""

    type_name: ClassVar[str] = "gptq"
    damp: float = 0.01  # fraction of the mean Hessian diagonal added before Cholesky
    block_size: int = 128  # columns per lazy-update block
    act_order: bool = True  # quantize columns by decreasing Hessian diagonal
    # With act-order, fix each group's scale/zero from the original column order before the
    # permuted pass, so the stored weight needs no reordering (no g_idx) at inference.
    static_groups: bool = True
    # One forward pass per layer, each Linear calibrated on inputs from the already-quantized
    # Linears before it (GPTQ's "true sequential"), not one pass to collect and one to propagate.
    true_sequential: bool = True
    # dtype of that pass (Hessians stay float32): "auto" is bfloat16 where matmuls have it natively.
    calib_dtype: str = "auto"
    # Fit each Linear to the float model's outputs (its inputs in the float model, run as a second
    # stream) rather than to its own float weights on already-degraded inputs. The float stream
    # runs the first float_target_samples calibration samples (None: all), at that many samples'
    # forward cost per layer. Needs true_sequential. On the default model (W4 g64, three
    # calibration seeds) it took the mean perplexity from 18.422 to 17.034; a float stream of
    # 32 of the 128 samples failed on one seed (docs/benchmarks.md), so all samples by default.
    float_targets: bool = True
    float_target_samples: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calib_dtype not in ("auto", "bfloat16", "float32"):
            raise ConfigError(
                f"calib_dtype must be auto, bfloat16 or float32, got {self.calib_dtype!r}"
            )
        if self.float_targets and not self.true_sequential:
            raise ConfigError(
                "float_targets needs true_sequential=True (the one-pass driver); "
                "set float_targets=False for the two-pass calibration"
            )
        if self.float_target_samples is not None and self.float_target_samples < 1:
            raise ConfigError(
                f"float_target_samples must be positive or None, got {self.float_target_samples}"
            )
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp must be in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be positive, got {self.block_size}")
        if self.act_order and not self.static_groups and self.group_size is not None:
            raise ConfigError(
                "act_order with groups needs static_groups=True: the packed format stores "
                "codes in the original column order with no group index"
            )


@dataclass(frozen=True)
class AWQConfig(QuantConfig):
    """AWQ (Lin et al. 2023): activation-aware channel scales folded into the preceding op."""

    type_name: ClassVar[str] = "awq"
    grid: int = 20  # alpha values tried: 0, 1/grid, ..., (grid-1)/grid
    duo: bool = False  # s = x^a / w^(1-a) (weight-aware) instead of s = x^a
    clip: bool = True  # search a per-group clipping ratio after the scales

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1:
            raise ConfigError(f"grid must be positive, got {self.grid}")
