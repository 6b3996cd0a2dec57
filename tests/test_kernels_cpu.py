"""Packed QuantLinear kernels against the float64 dequantized reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from openpto.core.quant.tensor import QuantizedWeight, quantize_weight
from openpto.errors import BackendUnavailable, ConfigError
from openpto.kernels import QuantLinear, model_kernel_summary, swap_to_packed
from openpto.kernels.base import kernel_reasons
from openpto.kernels.torch_ops import _int4_scales_and_zeros
from openpto.registry import KERNELS

CPU = torch.device("cpu")
# Max |error| relative to max |reference output|: float32 differs from float64 only in
# accumulation order; bfloat16 keeps 8 bits of mantissa in activations, scales and outputs.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


def tolerance(kernel: str, dtype: torch.dtype) -> float:
    # torch's CPU int4/int8 kernels always compute in bfloat16 (see torch_ops.CPU_COMPUTE).
    return TOLERANCE[dtype if kernel == "dequantized-reference" else torch.bfloat16]


def reference(
    qw: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    y = x.double() @ qw.dequantize(torch.float64).T
    return y + bias.double() if bias is not None else y


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


CASES = [
    # (bits, group, symmetric, expected kernel)
    (4, 64, False, "packed-int4-cpu"),
    (4, 32, True, "packed-int4-cpu"),
    (4, 128, False, "packed-int4-cpu"),
    (3, 64, False, "packed-int4-cpu"),
    (8, None, True, "packed-int8-cpu"),
    (8, None, False, "packed-int8-cpu"),
    (4, None, False, "packed-int8-cpu"),  # int4 per-channel: the int4 op needs groups <= 256
    (8, 64, True, "dequantized-reference"),  # int8 with groups: no CPU kernel
]


@pytest.mark.parametrize(("bits", "group", "symmetric", "expected"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_kernel_matches_float64_reference(
    bits: int, group: int | None, symmetric: bool, expected: str, dtype: torch.dtype
) -> None:
    torch.manual_seed(bits)
    w = torch.randn(96, 384) * 0.05
    qw = quantize_weight(w, bits, group, symmetric)
    bias = torch.randn(96)
    layer = QuantLinear(qw, bias, dtype=dtype)
    assert layer.kernel_name == expected
    for tokens in (1, 7):
        x = torch.randn(2, tokens, 384)
        y = layer(x.to(dtype))
        assert y.dtype == dtype and y.shape == (2, tokens, 96)
        ref = reference(qw, x.to(dtype).reshape(-1, 384), bias.to(dtype)).reshape(2, tokens, 96)
        assert rel_error(y, ref) < tolerance(expected, dtype), (expected, tokens)


@pytest.mark.parametrize("kernel", ["packed-int4-cpu", "packed-int8-cpu", "dequantized-reference"])
def test_every_cpu_kernel_by_name(kernel: str) -> None:
    torch.manual_seed(0)
    group = None if kernel == "packed-int8-cpu" else 64
    qw = quantize_weight(torch.randn(64, 128), 4, group, False)
    layer = QuantLinear(qw, kernel=kernel)
    x = torch.randn(5, 128)
    assert layer.kernel_name == kernel
    assert rel_error(layer(x), reference(qw, x)) < tolerance(kernel, torch.float32)


def test_asymmetric_zero_points_are_converted_exactly() -> None:
    # Zero-points at both ends of the grid and large offsets stress the (q - 8) * s + z form.
    torch.manual_seed(3)
    w = torch.randn(32, 256) * 0.02 + torch.linspace(-0.5, 0.5, 32)[:, None]
    qw = quantize_weight(w, 4, 32, False)
    assert qw.zero.min() == 0 and qw.zero.max() == 15
    exact = qw.dequantize(torch.float64)
    # The conversion itself, in float64: w = (q - 8) * s + z for every weight.
    sz = _int4_scales_and_zeros(qw, torch.float64)  # [groups, out, 2]
    s, z = (sz[..., i].T.repeat_interleave(32, dim=1) for i in (0, 1))
    torch.testing.assert_close((qw.q.double() - 8) * s + z, exact, rtol=0, atol=1e-12)
    # The op reads that convention: in float32 (slow but exact) it matches to float32 precision.
    x = torch.randn(3, 256)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.q.to(torch.int32), 1)
    y32 = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz.float())
    assert rel_error(y32, reference(qw, x)) < TOLERANCE[torch.float32]
    # And the module (bfloat16 compute) within bfloat16 tolerance.
    y = QuantLinear(qw, kernel="packed-int4-cpu")(x)
    assert y.dtype == torch.float32
    assert rel_error(y, reference(qw, x)) < TOLERANCE[torch.bfloat16]
    # int8, asymmetric 8-bit (the q - 128 plus row-offset form) and 4-bit per-channel (q - zero).
    for bits in (8, 4):
        qw8 = quantize_weight(w, bits, None, False)
        layer = QuantLinear(qw8, kernel="packed-int8-cpu")
        weight, offset = layer.get_buffer("weight"), layer.get_buffer("offset")
        scale = qw8.scale.double()
        rebuilt = weight.double() * scale + (offset.double()[:, None] if offset.numel() else 0)
        torch.testing.assert_close(rebuilt, qw8.dequantize(torch.float64), rtol=1e-6, atol=1e-7)
        assert rel_error(layer(x), reference(qw8, x)) < TOLERANCE[torch.bfloat16]


def test_unavailable_kernels_say_why() -> None:
    qw = quantize_weight(torch.randn(24, 64), 4, 32, False)  # 24 rows: not a multiple of 16
    reasons = kernel_reasons(qw, CPU, torch.float32)
    assert set(reasons) >= {
        "packed-int4-cpu",
        "packed-int8-cpu",
        "tinygemm-int4-cuda",
        "dequantized-reference",
    }
    assert reasons["dequantized-reference"] is None
    assert "divisible by 16" in str(reasons["packed-int4-cpu"])
    assert reasons["tinygemm-int4-cuda"] == "CUDA only"
    assert QuantLinear(qw).kernel_name == "dequantized-reference"
    with pytest.raises(BackendUnavailable, match="divisible by 16"):
        QuantLinear(qw, kernel="packed-int4-cpu")
    assert "packed-int4-cpu" in KERNELS


def test_int4_resident_bytes_drop() -> None:
    qw = quantize_weight(torch.randn(576, 1536), 4, 64, False)
    layer = QuantLinear(qw)
    dense = 576 * 1536 * 4
    # int4 codes (1/8 of float32) plus a bfloat16 scale and offset per 64 weights.
    assert layer.packed_nbytes() == 576 * 1536 // 2 + 576 * 24 * 2 * 2
    assert layer.packed_nbytes() < 0.16 * dense
    int8 = QuantLinear(quantize_weight(torch.randn(576, 1536), 8, None, True))
    assert int8.packed_nbytes() == 576 * 1536 + 576 * 2


def _tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32, bias=False), nn.Linear(32, 16)
    )


def test_swap_to_packed_keeps_the_function_and_reports_kernels() -> None:
    model = _tiny_mlp()
    quantized = {
        "0": quantize_weight(model[0].weight.data, 4, 64, False),
        "2": quantize_weight(model[2].weight.data, 8, None, True),
    }
    for name, qw in quantized.items():
        model.get_submodule(name).weight.data = qw.dequantize()
    x = torch.randn(4, 128)
    with torch.no_grad():
        expected = model(x)
    summary = swap_to_packed(model, quantized)
    assert summary == {"dense": 1, "packed-int4-cpu": 1, "packed-int8-cpu": 1}
    assert model_kernel_summary(model) == summary
    assert isinstance(model[0], QuantLinear) and "kernel=packed-int4-cpu" in repr(model[0])
    with torch.no_grad():
        assert rel_error(model(x), expected.double()) < TOLERANCE[torch.bfloat16]


def test_swap_to_packed_refuses_mismatches() -> None:
    model = _tiny_mlp()
    with pytest.raises(ConfigError, match="no module"):
        swap_to_packed(model, {"9": quantize_weight(torch.randn(64, 128), 4, 64, False)})
    with pytest.raises(ConfigError, match=r"not an nn\.Linear"):
        swap_to_packed(model, {"1": quantize_weight(torch.randn(64, 128), 4, 64, False)})
    with pytest.raises(ConfigError, match="shape"):
        swap_to_packed(model, {"0": quantize_weight(torch.randn(32, 128), 4, 64, False)})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tinygemm_matches_reference_on_cuda() -> None:
    torch.manual_seed(0)
    qw = quantize_weight(torch.randn(256, 576) * 0.05, 4, 64, False)
    layer = QuantLinear(qw, dtype=torch.bfloat16, device="cuda")
    assert layer.kernel_name == "tinygemm-int4-cuda"
    x = torch.randn(8, 576, device="cuda", dtype=torch.bfloat16)
    assert rel_error(layer(x).cpu(), reference(qw, x.cpu())) < TOLERANCE[torch.bfloat16]
