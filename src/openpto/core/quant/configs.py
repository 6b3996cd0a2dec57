"""Frozen configs of the quantization methods; each is dispatched by type through ``TRANSFORMS``.

Every field has a one-line description (``option``), shown by ``opt quantize --show-config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from openpto.config import MethodConfig, option
from openpto.core.quant.primitives import GROUP_SIZES, check_bits
from openpto.errors import ConfigError

#: ``group_size="auto"``: the quantize workflow picks the size once the model's widths are known
AUTO_GROUP_SIZE = "auto"


def _check_group(group_size: int | str | None) -> None:
    if group_size is None or group_size == AUTO_GROUP_SIZE:
        return
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        sizes = ", ".join(str(g) for g in GROUP_SIZES)
        raise ConfigError(
            f"group size must be one of {sizes}, None (per-channel) or 'auto', "
            f"got {group_size!r}"
        )


GROUP_HELP = ("input columns sharing one scale: 32, 64, 128, None (one per output row) or "
              "'auto' (per-channel at 8 bits, else the largest of 128/64/32 dividing every width)")


@dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """What every weight-only quantization method shares: the integer grid."""

    bits: int = option(4, "bits per weight (2 to 8)")
    group_size: int | str | None = option(64, GROUP_HELP)
    symmetric: bool = option(False, "symmetric grid (no zero point) instead of asymmetric")

    def __post_init__(self) -> None:
        check_bits(self.bits)
        _check_group(self.group_size)


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest with min/max scales: no calibration data."""

    type_name: ClassVar[str] = "rtn"
    needs_calibration: ClassVar[bool] = False
    # INT8 per-channel symmetric is the near-lossless default; INT4 wants groups.
    bits: int = 8
    group_size: int | str | None = None
    symmetric: bool = True


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ (Frantar et al. 2022): error-compensating rounding driven by the layer Hessian."""

    type_name: ClassVar[str] = "gptq"
    damp: float = option(0.01, "fraction of the mean Hessian diagonal added before Cholesky")
    block_size: int = option(128, "columns per lazy-update block")
    act_order: bool = option(True, "quantize columns by decreasing Hessian diagonal")
    # With act-order, fix each group's scale/zero from the original column order before the
    # permuted pass, so the stored weight needs no reordering (no g_idx) at inference.
    static_groups: bool = option(
        True, "with act_order: fix each group's scale from the original column order (no g_idx)")
    # One forward pass per layer, each Linear calibrated on inputs from the already-quantized
    # Linears before it (GPTQ's "true sequential"), not one pass to collect and one to propagate.
    true_sequential: bool = option(
        True, "one pass per layer, each Linear calibrated on inputs from the quantized ones "
        "before it (else one pass to collect and one to propagate)")
    # dtype of that pass (Hessians stay float32): "auto" is bfloat16 where matmuls have it natively.
    calib_dtype: str = option(
        "auto", "dtype of the calibration pass: auto (bfloat16 where native), bfloat16, float32")
    # Fit each Linear to the float model's outputs (its inputs in the float model, run as a second
    # stream) rather than to its own float weights on already-degraded inputs. The float stream
    # runs the first float_target_samples calibration samples (None: all), at that many samples'
    # forward cost per layer. Needs true_sequential. On the default model (W4 g64, three
    # calibration seeds) it took the mean perplexity from 18.422 to 17.034; a float stream of
    # 32 of the 128 samples failed on one seed (docs/benchmarks.md), so all samples by default.
    float_targets: bool = option(
        True, "fit each Linear to the float model's outputs (a second, float stream; needs "
        "true_sequential)")
    float_target_samples: int | None = option(
        None, "calibration samples the float stream runs (None: all)")

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
    grid: int = option(20, "alpha values tried: 0, 1/grid, ..., (grid-1)/grid")
    duo: bool = option(False, "scales s = x^a / w^(1-a) (weight-aware) instead of s = x^a")
    clip: bool = option(True, "search a per-group clipping ratio after the scales")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1:
            raise ConfigError(f"grid must be positive, got {self.grid}")


@dataclass(frozen=True)
class NF4Config(QuantConfig):
    """bitsandbytes' 4-bit NormalFloat: absmax blocks of 64, data-free (``--backend
    bitsandbytes``)."""

    type_name: ClassVar[str] = "nf4"
    needs_calibration: ClassVar[bool] = False
    bits: int = 4
    group_size: int | str | None = 64
    symmetric: bool = True


@dataclass(frozen=True)
class LLMInt8Config(QuantConfig):
    """bitsandbytes' LLM.int8: int8 weights with one absmax scale per row, data-free
    (``--backend bitsandbytes``)."""

    type_name: ClassVar[str] = "int8"
    needs_calibration: ClassVar[bool] = False
    bits: int = 8
    group_size: int | str | None = None
    symmetric: bool = True
