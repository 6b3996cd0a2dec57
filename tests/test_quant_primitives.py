"""Quantization primitives against float64 references, and packers against compressed-tensors."""

from __future__ import annotations

import pytest
import torch

from openpto.core.quant.primitives import (
    compute_qparams,
    pack_int4,
    pack_int8,
    pack_int32,
    resolve_group_size,
    sqnr_db,
    unpack_int4,
    unpack_int8,
    unpack_int32,
)
from openpto.core.quant.tensor import QuantizedWeight, quantize_weight
from openpto.errors import ConfigError

GROUPS = (32, 64, 128, None)


def reference_quantize(w: torch.Tensor, bits: int, group: int | None, symmetric: bool):  # type: ignore[no-untyped-def]
    """The textbook formulas in float64, one group at a time."""
    w = w.double()
    rows, cols = w.shape
    g = group or cols
    maxq = 2**bits - 1
    q = torch.empty(rows, cols, dtype=torch.float64)
    scales = torch.empty(rows, cols // g, dtype=torch.float64)
    zeros = torch.empty_like(scales)
    for j in range(cols // g):
        block = w[:, j * g : (j + 1) * g]
        if symmetric:
            scale = block.abs().amax(1) / (maxq / 2)
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:
            lo = torch.minimum(block.amin(1), torch.zeros(rows, dtype=torch.float64))
            hi = torch.maximum(block.amax(1), torch.zeros(rows, dtype=torch.float64))
            scale = (hi - lo) / maxq
            zero = torch.round(-lo / scale).clamp(0, maxq)
        q[:, j * g : (j + 1) * g] = (torch.round(block / scale[:, None]) + zero[:, None]).clamp(
            0, maxq
        )
        scales[:, j], zeros[:, j] = scale, zero
    return q, scales, zeros


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_matches_float64_reference(bits: int, group: int | None, symmetric: bool) -> None:
    torch.manual_seed(bits)
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3
    qw = quantize_weight(w, bits, group, symmetric)
    q_ref, s_ref, z_ref = reference_quantize(w, bits, group, symmetric)
    torch.testing.assert_close(qw.scale.double(), s_ref, rtol=1e-6, atol=0)
    assert torch.equal(qw.zero.double(), z_ref)
    # float32 and float64 division may round a .5 tie differently (symmetric grids put every
    # group's absmax exactly on one): codes may differ by one there and only there.
    diff = (qw.q.double() - q_ref).abs()
    ratio = w.double().view(48, -1, qw.group_size) / s_ref[..., None]
    tie = ((ratio - ratio.floor() - 0.5).abs() < 1e-5).view(48, -1)
    assert diff.max() <= 1 and not (diff[~tie] > 0).any()
    # Dequantization of the same codes agrees with float64 to float32 precision.
    deq_ref = (
        (qw.q.double().view(48, -1, qw.group_size) - z_ref[..., None]) * s_ref[..., None]
    ).view(48, -1)
    torch.testing.assert_close(qw.dequantize(torch.float64), deq_ref, rtol=1e-6, atol=1e-7)
    # Every weight lies within the range, so the rounding error is at most half a step.
    step = qw.scale.repeat_interleave(qw.group_size, dim=1)
    assert ((qw.dequantize() - w).abs() <= step * 0.5 + 1e-6 * w.abs().max()).all()


@pytest.mark.parametrize("bits", range(2, 9))
def test_sqnr_floors(bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    measured = {}
    for group in GROUPS:
        for symmetric in (False, True):
            measured[group, symmetric] = sqnr_db(
                w, quantize_weight(w, bits, group, symmetric).dequantize()
            )
            # About 6 dB per bit on Gaussian weights (the worst setting measured 6.02*bits - 5.7).
            assert measured[group, symmetric] > 6.02 * bits - 8, (group, symmetric)
    # Smaller groups never hurt.
    for symmetric in (False, True):
        values = [measured[g, symmetric] for g in GROUPS]
        assert values == sorted(values, reverse=True)


def test_int8_per_channel_and_int4_g64_sqnr() -> None:
    torch.manual_seed(1)
    w = torch.randn(576, 576) * 0.05
    assert sqnr_db(w, quantize_weight(w, 8, None, True).dequantize()) > 40
    assert sqnr_db(w, quantize_weight(w, 4, 64, False).dequantize()) > 19.5


def test_zero_group_and_exact_zeros() -> None:
    w = torch.zeros(4, 64)
    w[1, :32] = torch.linspace(-1, 1, 32)
    for symmetric in (False, True):
        qw = quantize_weight(w, 4, 32, symmetric)
        assert torch.isfinite(qw.scale).all()
        deq = qw.dequantize()
        assert torch.equal(deq[w == 0], torch.zeros_like(deq[w == 0]))


def test_group_size_that_does_not_divide_names_the_ones_that_do() -> None:
    with pytest.raises(ConfigError, match=r"group sizes that do: 32, 64 \(or per-channel\)"):
        resolve_group_size(576, 128)
    with pytest.raises(ConfigError, match="none of 32, 64, 128"):
        quantize_weight(torch.randn(4, 48), 4, 32, False)
    assert resolve_group_size(576, None) == 576


def test_quantized_weight_validates_shapes() -> None:
    q = torch.zeros(8, 64, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="scale must have shape"):
        QuantizedWeight(q, torch.ones(8, 1), torch.zeros(8, 2), 4, 32, False)
    with pytest.raises(ConfigError, match="uint8"):
        QuantizedWeight(q.int(), torch.ones(8, 2), torch.zeros(8, 2), 4, 32, False)
    with pytest.raises(ConfigError, match="bits"):
        QuantizedWeight(q, torch.ones(8, 2), torch.zeros(8, 2), 9, 32, False)
    qw = QuantizedWeight(q, torch.ones(8, 2), torch.zeros(8, 2), 4, 32, False)
    assert qw.packed_nbytes() == 8 * 64 // 2 + 16 // 2 + 16 * 2


def test_compute_qparams_clip_shrinks_the_range() -> None:
    w = torch.randn(3, 64)
    full, _ = compute_qparams(w, 4, 32, True)
    half, _ = compute_qparams(w, 4, 32, True, clip=0.5)
    torch.testing.assert_close(half, full * 0.5)


def test_int4_and_int8_pack_round_trip() -> None:
    q4 = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(q4)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q4)
    assert torch.equal(packed[:, 0], q4[:, 0] | (q4[:, 1] << 4))
    q8 = torch.randint(0, 256, (5, 64), dtype=torch.uint8)
    assert pack_int8(q8).dtype == torch.int8
    assert torch.equal(pack_int8(q8).to(torch.int16), q8.to(torch.int16) - 128)
    assert torch.equal(unpack_int8(pack_int8(q8)), q8)
    with pytest.raises(ConfigError, match="even"):
        pack_int4(q4[:, :3])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(6, 64), (5, 100), (33, 7)])
@pytest.mark.parametrize("packed_dim", [0, 1])
def test_pack_int32_matches_compressed_tensors(
    bits: int, shape: tuple[int, int], packed_dim: int
) -> None:
    ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    torch.manual_seed(bits)
    q = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    signed = (q.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    theirs = ct_helpers.pack_to_int32(signed, bits, packed_dim=packed_dim)
    ours = pack_int32(q, bits, packed_dim=packed_dim)
    assert ours.dtype == torch.int32 and torch.equal(ours, theirs)
    assert torch.equal(unpack_int32(ours, bits, shape, packed_dim=packed_dim), q)
    unpacked = ct_helpers.unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=packed_dim)
    assert torch.equal(unpacked, signed)


def test_int4_bytes_are_the_little_endian_int32_words() -> None:
    q = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    assert torch.equal(pack_int4(q).view(torch.int32), pack_int32(q, 4))
