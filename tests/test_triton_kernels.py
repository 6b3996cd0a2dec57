"""The Triton kernels against float32 references on the GPU (skipped without CUDA and triton).

Every check draws fresh random data, pre-fills the output with NaN so that an unwritten element
fails, and bounds the relative error by what bf16 outputs allow.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from openpto.kernels import gpu_dispatch as gd
from openpto.kernels.gpu_dispatch import Launch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
]

BF16_LIMIT = 1e-2  # bf16 outputs round at 2**-9 relative; 1e-2 also catches any wrong element


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert bool(torch.isfinite(out).all()), "an output element was not written"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _int4(n: int, k: int, g: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3
    zero = torch.randint(0, 16, (n, k // g), generator=gen).float()
    packed = gd.pack_w4a16(q, scale, zero, g)
    ref = gd.dequantize_w4a16(packed["qweight"], packed["sz"])
    return {k_: v.cuda() for k_, v in packed.items()}, ref.cuda()


LAUNCHES = [
    Launch("gemv", 128, 1, 1, 1, 1, 16, False),
    Launch("gemv", 256, 2, 4, 2, 1, 8, True),
    Launch("gemv", 512, 1, 2, 4, 1, 8, False),
    Launch("gemv", 512, 2, 8, 4, 1, 16, False),
    Launch("gemv", 256, 1, 8, 2, 1, 8, True),
    Launch("gemv", 256, 2, 8, 2, 1, 16, False, True),
    Launch("gemv", 512, 1, 16, 4, 1, 8, True, True),
    Launch("dot", 64, 16, 1, 4),
    Launch("dot", 128, 16, 4, 4, 2),
    Launch("dot", 128, 64, 1, 4, 2),
    Launch("dequant", 256),
]


@pytest.mark.parametrize("m", [1, 3, 7, 16, 40, 130])
@pytest.mark.parametrize(("n", "k", "g"), [(520, 1024, 128), (256, 2048, 256)])
def test_w4a16_every_path_matches_reference(m: int, n: int, k: int, g: int) -> None:
    from openpto.kernels.triton import w4a16

    packed, w_ref = _int4(n, k, g, seed=m + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w_ref.t()
    for launch in LAUNCHES:
        split_ok = launch.path != "dot" or launch.split_k == 1 or m <= launch.block_m
        if not split_ok or (k // 128) % launch.split_k:
            continue
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = w4a16.w4a16_matmul(x, packed["qweight"], packed["sz"], g, launch, out=out)
        assert rel_error(y, ref) < BF16_LIMIT, launch


def test_w4a16_split_k_is_deterministic_and_leaves_counters_at_zero() -> None:
    from openpto.kernels.triton import common, w4a16

    packed, _ = _int4(1024, 4096, 128, seed=1)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    launch = Launch("gemv", 512, 2, 32, 4, 1, 8, True)
    first = w4a16.w4a16_matmul(x, packed["qweight"], packed["sz"], 128, launch)
    for _ in range(20):
        assert torch.equal(
            w4a16.w4a16_matmul(x, packed["qweight"], packed["sz"], 128, launch), first
        )
    torch.cuda.synchronize()
    _, locks = common.WORKSPACE.get(x.device, 0, 0)
    assert int(locks.abs().sum()) == 0
    atomic = Launch("gemv", 256, 1, 32, 2, 1, 8, True, True)
    y = w4a16.w4a16_matmul(x, packed["qweight"], packed["sz"], 128, atomic)
    assert rel_error(y, first) < 1e-2  # same sums in another order
    torch.cuda.synchronize()
    assert float(common.WORKSPACE.accumulator(x.device, 0).abs().sum()) == 0.0
    assert int(locks.abs().sum()) == 0


@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_sparse24_kernels_match_reference(m: int) -> None:
    from openpto.kernels.triton import sparse24

    n, k, g = 384, 1024, 128
    gen = torch.Generator().manual_seed(m)
    pos = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, pos, True).reshape(n, k)
    c = {k_: v.cuda() for k_, v in gd.compress_24(torch.randn(n, k, generator=gen) * keep).items()}
    ref_bf16 = gd.decompress_24(c["values"].cpu(), c["meta"].cpu()).float().cuda()
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scale = torch.rand(n, k // g, generator=gen) * 0.01 + 1e-3
    zero = torch.randint(0, 16, (n, k // g), generator=gen).float()
    ci = {k_: v.cuda() for k_, v in gd.compress_24_int4(q, scale, zero, g, mask=keep).items()}
    ref_int4 = gd.dequantize_24_int4(*(ci[n_].cpu() for n_ in ("values", "meta", "sz"))).cuda()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for launch in (Launch("gemv", 128, min(m, 4), 1, 4), Launch("gemv", 512, 2, 4, 4)):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        y = sparse24.sparse24_matmul(x, c["values"], c["meta"], launch, out=out)
        assert rel_error(y, x.float() @ ref_bf16.t()) < BF16_LIMIT
        out.fill_(float("nan"))
        y = sparse24.sparse24_matmul(x, ci["values"], ci["meta"], launch, ci["sz"], g, out=out)
        assert rel_error(y, x.float() @ ref_int4.t()) < BF16_LIMIT
    wt = sparse24.expand24(c["values"], c["meta"], torch.float32)
    assert torch.equal(wt.t(), ref_bf16)
    wt = sparse24.expand24(ci["values"], ci["meta"], torch.float32, ci["sz"], g)
    assert torch.equal(wt.t(), ref_int4)


def test_quant_linear_picks_triton_and_matches_reference() -> None:
    from openpto.core.quant.tensor import quantize_weight
    from openpto.kernels.quant_linear import QuantLinear
    from openpto.kernels.triton.linear import dense_reference

    w = torch.randn(512, 1024)
    qw = quantize_weight(w, bits=4, group_size=128, symmetric=False)
    layer = QuantLinear(qw, kernel="auto", dtype=torch.bfloat16, device="cuda")
    assert layer.kernel_name == "triton-w4a16"
    keep = torch.rand(512, 256, 4).argsort(-1)[..., :2]
    mask = torch.zeros(512, 256, 4, dtype=torch.bool).scatter_(2, keep, True).reshape(512, 1024)
    qs = quantize_weight(w * mask, bits=4, group_size=128, symmetric=False)
    assert QuantLinear(qs, dtype=torch.bfloat16, device="cuda").kernel_name == "triton-w4a16"
    sparse = QuantLinear(qs, kernel="triton-w4a16-2:4", dtype=torch.bfloat16, device="cuda")
    for mod in (layer, sparse):
        for m in (1, 9, 70):
            x = torch.randn(2, m, 1024, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ dense_reference(mod).cuda().t()
            assert rel_error(mod(x), ref) < BF16_LIMIT


def test_sparse24_linear_matches_dense_linear() -> None:
    from openpto.kernels.triton.linear import Compressed24Linear

    lin = torch.nn.Linear(1024, 768, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        w = lin.weight.view(768, 256, 4)
        keep = torch.rand(768, 256, 4, device="cuda").argsort(-1)[..., :2]
        lin.weight.mul_(torch.zeros_like(w).scatter_(2, keep, 1.0).view(768, 1024))
    sp = Compressed24Linear.from_linear(lin)
    for m in (1, 4, 33):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        assert rel_error(sp(x), F.linear(x.float(), lin.weight.float(), lin.bias.float())) < 1e-2
