"""Layouts and dispatch of the Triton GPU kernels, on the CPU and without triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from openpto.core.quant.tensor import QuantizedWeight, quantize_weight
from openpto.errors import ConfigError
from openpto.kernels import gpu_dispatch as gd
from openpto.kernels.gpu_dispatch import Launch


def _codes(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)


def _mask24(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, pos, True).reshape(n, k)


@pytest.mark.parametrize(("n", "k"), [(8, 128), (24, 384), (40, 1024)])
def test_pack_codes_round_trip_and_word_layout(n: int, k: int) -> None:
    q = _codes(n, k, seed=n)
    words = gd.pack_codes(q)
    assert words.dtype == torch.int32 and tuple(words.shape) == (k // 8, n)
    assert torch.equal(gd.unpack_codes(words), q)
    # nibble j of word (16b + r, n) is column 128b + 16j + r
    b, r, j, col = 1 if k > 128 else 0, 5, 6, 3
    word = int(words[16 * b + r, col]) & 0xFFFFFFFF
    assert (word >> (4 * j)) & 0xF == int(q[col, 128 * b + 16 * j + r])


def test_pack_codes_refuses_bad_shapes_and_codes() -> None:
    with pytest.raises(ConfigError, match="divisible by 128"):
        gd.pack_codes(_codes(8, 96))
    with pytest.raises(ConfigError, match=r"\[0, 15\]"):
        gd.pack_codes(torch.full((8, 128), 16, dtype=torch.uint8))


def test_scale_zero_words_hold_bf16_scale_and_exact_zero() -> None:
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(16, 4, generator=g) + 1e-3
    zero = torch.randint(0, 16, (16, 4), generator=g).float()
    s, z = gd.unpack_scale_zero(gd.pack_scale_zero(scale, zero))
    assert torch.equal(s, scale.to(torch.bfloat16).float())
    assert torch.equal(z, zero)


@pytest.mark.parametrize("group_size", [128, 256, 512])
def test_dequantize_w4a16_matches_quantized_weight(group_size: int) -> None:
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(2))
    qw = quantize_weight(w, bits=4, group_size=group_size, symmetric=False)
    packed = gd.pack_w4a16(qw.q, qw.scale, qw.zero, qw.group_size)
    # the packed scales are bf16; with bf16-rounded scales the dequantization is exact
    ref = QuantizedWeight(
        qw.q, qw.scale.to(torch.bfloat16).float(), qw.zero, 4, group_size, False
    ).dequantize()
    assert torch.equal(gd.dequantize_w4a16(packed["qweight"], packed["sz"]), ref)
    # and the bf16 scale moves each weight by at most 2**-9 of its group's scale times 15
    err = (gd.dequantize_w4a16(packed["qweight"], packed["sz"]) - qw.dequantize()).abs()
    assert float(err.max()) <= 15 * 2**-9 * float(qw.scale.max())


def test_pack_w4a16_refuses_group_sizes_the_kernels_cannot_read() -> None:
    qw = quantize_weight(torch.randn(8, 256), bits=4, group_size=64, symmetric=False)
    with pytest.raises(ConfigError, match="multiple of 128"):
        gd.pack_w4a16(qw.q, qw.scale, qw.zero, qw.group_size)


def test_compress_24_round_trip_is_exact() -> None:
    n, k = 24, 256
    keep = _mask24(n, k, seed=3)
    keep[0, :4] = False  # a group that keeps nothing
    keep[1, 4:8] = torch.tensor([False, False, True, False])  # a group that keeps one
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * keep
    c = gd.compress_24(w)
    assert tuple(c["values"].shape) == (k // 4, n) and tuple(c["meta"].shape) == (k // 32, n)
    assert torch.equal(gd.decompress_24(c["values"], c["meta"]), w.to(torch.bfloat16))
    # meta nibble j of word (R, n): p0 in bits 0-1, p1 in bits 2-3, p0 < p1
    p = gd.positions_24(keep)
    word = int(c["meta"][0, 5]) & 0xFFFFFFFF
    nib = (word >> 12) & 0xF  # group t = 3 of row 5
    assert (nib & 3, nib >> 2) == (int(p[5, 3, 0]), int(p[5, 3, 1]))
    assert bool((p[..., 0] < p[..., 1]).all())


def test_compress_24_refuses_dense_groups() -> None:
    w = torch.randn(8, 128)
    with pytest.raises(ConfigError, match="not 2:4"):
        gd.compress_24(w)


def test_compress_24_int4_round_trip() -> None:
    n, k, g = 16, 256, 128
    keep = _mask24(n, k, seed=4)
    qw = quantize_weight(torch.randn(n, k) * keep, bits=4, group_size=g, symmetric=False)
    c = gd.compress_24_int4(qw.q, qw.scale, qw.zero, g, mask=keep)
    assert tuple(c["values"].shape) == (k // 16, n)
    codes = gd.decompress_24_int4(c["values"], c["meta"])
    assert torch.equal(codes[keep], qw.q[keep])
    assert bool((codes[~keep] == 255).all())
    dense = QuantizedWeight(
        qw.q, qw.scale.to(torch.bfloat16).float(), qw.zero, 4, g, False
    ).dequantize()
    assert torch.equal(gd.dequantize_24_int4(c["values"], c["meta"], c["sz"]), dense * keep)


def test_compress_24_int4_infers_the_mask_from_zero_points() -> None:
    n, k, g = 8, 128, 128
    keep = _mask24(n, k, seed=5)
    qw = quantize_weight(torch.randn(n, k) * keep, bits=4, group_size=g, symmetric=False)
    inferred = gd.compress_24_int4(qw.q, qw.scale, qw.zero, g)
    w = gd.dequantize_24_int4(inferred["values"], inferred["meta"], inferred["sz"])
    ref = QuantizedWeight(qw.q, qw.scale.to(torch.bfloat16).float(), qw.zero, 4, g, False)
    assert torch.equal(w, ref.dequantize())


def test_is_24_int4_detects_pruned_codes() -> None:
    from openpto.kernels.triton.linear import is_24_int4

    keep = _mask24(16, 256, seed=6)
    pruned = quantize_weight(torch.randn(16, 256) * keep, bits=4, group_size=128, symmetric=False)
    dense = quantize_weight(torch.randn(16, 256), bits=4, group_size=128, symmetric=False)
    assert is_24_int4(pruned)
    assert not is_24_int4(dense)


@pytest.mark.parametrize(
    ("m", "path", "block_m"),
    [
        (1, "gemv", 1),
        (2, "gemv", 2),
        (3, "dot", 16),
        (8, "dot", 16),
        (16, "dot", 16),
        (33, "dot", 64),
        (128, "dequant", 1),
        (2048, "dequant", 1),
    ],
)
def test_choose_w4a16_by_token_count(m: int, path: str, block_m: int) -> None:
    launch = gd.choose_w4a16(m, 4096, 14336)
    assert (launch.path, launch.block_m) == (path, block_m)
    if path != "dequant":
        assert (14336 // 128) % launch.split_k == 0


def test_choose_w4a16_prefers_the_tuned_table() -> None:
    tuned = {(4096, 4096, 2): Launch("gemv", 512, 2, 8, 4, 1, 8, True)}
    assert gd.choose_w4a16(2, 4096, 4096, tuned) == tuned[(4096, 4096, 2)]
    assert gd.choose_w4a16(1, 4096, 4096, tuned).path == "gemv"
    with pytest.raises(ConfigError):
        gd.choose_w4a16(0, 4096, 4096)


def test_split_fills_the_gpu_and_divides_the_kblocks() -> None:
    # 16 strips of 256 outputs need 33 splits for 4 programs per SM; 32 is the first divisor
    assert gd.default_split(16, 32) == 32
    assert gd.default_split(56, 32) == 16
    assert gd.default_split(2000, 32) == 1
    # 4 strips of 1024 over 112 kblocks: capped at 28, the largest divisor of 112 up to 32
    assert gd.default_split(4, 112) == 28
    assert [gd.token_bucket(m) for m in (1, 3, 5, 17, 100, 5000)] == [1, 4, 8, 32, 128, 4096]
    launch = gd.choose_24(3, 4096, 4096, "int4")
    assert (launch.path, launch.block_m) == ("gemv", 2)
    assert gd.choose_24(16, 4096, 4096, "bf16").block_m == 2


def test_triton_kernels_report_why_they_cannot_run_on_cpu() -> None:
    from openpto.kernels.base import kernel_reasons

    qw = quantize_weight(torch.randn(16, 256), bits=4, group_size=128, symmetric=False)
    reasons = kernel_reasons(qw, torch.device("cpu"), torch.bfloat16)
    assert reasons["triton-w4a16"] == "CUDA only"
    assert reasons["triton-w4a16-2:4"] == "CUDA only"


def test_importing_the_kernel_classes_imports_no_triton() -> None:
    code = (
        "import sys, openpto.kernels, openpto.kernels.triton.linear, openpto.kernels.triton.tuned;"
        "assert 'triton' not in sys.modules, 'triton was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
