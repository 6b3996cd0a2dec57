"""The one-pass ("true sequential") calibration driver, stacked GPTQ solves, bfloat16 Hessians."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from openpto.core.calibrate import PhaseClock, run_linear_sequential
from openpto.core.hessian import HessianAccumulator, factorizes, hessian_of
from openpto.core.quant import GPTQConfig, RTNConfig
from openpto.core.quant.gptq import GPTQ, gptq_solve
from openpto.core.quant.gptq_calibration import GPTQCompressor, calib_dtype
from openpto.errors import ConfigError
from tests.helpers import RoundingCompressor, linear_inputs, quantized_logit_error, tiny_llama


def test_each_linear_sees_inputs_of_the_already_compressed_model() -> None:
    model = tiny_llama(num_hidden_layers=2)
    calib = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    compressor = RoundingCompressor()
    events = []
    reports = run_linear_sequential(model, calib, compressor, on_layer=events.append)
    assert len(reports) == 2 * 7 and [e.index for e in events] == [0, 1]
    assert set(events[0].phases) >= {"forward"} and events[0].phases_cpu["forward"] >= 0
    # Inputs sharing one tensor are handed over together, in call order.
    assert compressor.groups[:4] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    # Every Linear saw exactly what it sees in the fully compressed model: errors propagated.
    inputs = linear_inputs(model, calib)
    assert set(compressor.inputs) == {n for n in inputs if ".layers." in n}
    for name, seen in compressor.inputs.items():
        torch.testing.assert_close(seen, inputs[name], rtol=1e-5, atol=1e-5)


def test_stacked_solve_gives_the_codes_of_separate_solves() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    H = 2 * x.t() @ x / x.shape[0]
    parts = [torch.randn(rows, 64, generator=gen) for rows in (48, 16, 16)]
    config = GPTQConfig(bits=4, group_size=32)
    stacked, damp, _ = gptq_solve(torch.cat(parts), H, config)
    row = 0
    for w in parts:
        alone, alone_damp, _ = gptq_solve(w, H, config)
        assert alone_damp == damp
        assert torch.equal(stacked.q[row : row + w.shape[0]], alone.q)
        assert torch.equal(stacked.scale[row : row + w.shape[0]], alone.scale)
        row += w.shape[0]


def test_hessian_strips_and_bfloat16_against_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 600, generator=gen) @ torch.randn(600, 600, generator=gen) / 20
    reference = 2 * x.double().t() @ x.double() / x.shape[0]
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        acc = HessianAccumulator(600, dtype=dtype)
        for chunk in x.split(1000):
            acc.add_batch(chunk)
        assert torch.equal(acc.H, acc.H.t())
        error = (acc.H.double() - reference).norm() / reference.norm()
        assert error < tolerance, (dtype, float(error))


def _inputs_with_a_massive_direction(scale: float = 10.0) -> torch.Tensor:
    # One direction, spread over every column, carries most of the energy (as in the attention
    # outputs o_proj reads): bfloat16 rounding of H's entries then swamps its small eigenvalues.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4096, 192, generator=gen)
    x += scale * torch.randn(4096, 1, generator=gen) * torch.randn(192, generator=gen)
    return x.bfloat16()


def test_indefinite_bfloat16_hessian_is_recomputed_in_float32() -> None:
    x = _inputs_with_a_massive_direction()
    reference = 2 * x.double().t() @ x.double() / x.shape[0]
    assert torch.linalg.eigvalsh(reference)[0] > 0
    rounded = HessianAccumulator(192, dtype=torch.bfloat16)
    rounded.add_batch(x)
    assert not factorizes(rounded.H, 0.01)
    exact = hessian_of(x, "cpu", torch.bfloat16, damp=0.01)
    assert exact.dtype == torch.float32 and factorizes(exact.H, 0.01)
    assert (exact.H.double() - reference).norm() / reference.norm() < 1e-6
    # An H that factors only thanks to most of the dampening is recomputed too: the refit would
    # divide by what is left of its rounding-made negative eigenvalues.
    assert factorizes(rounded.H, 0.1) and not factorizes(rounded.H, 0.01)
    assert hessian_of(x, "cpu", torch.bfloat16, damp=0.1).dtype == torch.float32
    # Ordinary inputs keep the cheaper bfloat16 products.
    plain = torch.randn(4096, 192, generator=torch.Generator().manual_seed(6)).bfloat16()
    assert hessian_of(plain, "cpu", torch.bfloat16, damp=0.01).dtype == torch.bfloat16


def test_gptq_keeps_its_dampening_where_bfloat16_products_would_break_h() -> None:
    x = _inputs_with_a_massive_direction()
    linear = nn.Linear(192, 32, bias=False)
    compressor = GPTQCompressor(GPTQConfig(bits=4, group_size=64), torch.bfloat16)
    (report,) = compressor.compress_group(0, "layers.0", {"o_proj": linear}, x, PhaseClock())
    assert report.extra["damp"] == 0.01
    assert report.extra["hessian_products"] == "float32"


def test_one_pass_gptq_matches_two_pass_quality_on_a_tiny_llama() -> None:
    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=2)
    calib = torch.randint(0, 512, (16, 256), generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(4))

    def logit_error(config: GPTQConfig | RTNConfig) -> float:
        return quantized_logit_error(
            base, config, None if isinstance(config, RTNConfig) else calib, ids)

    rtn = logit_error(RTNConfig(bits=4, group_size=32))
    two = logit_error(GPTQConfig(bits=4, group_size=32, true_sequential=False,
                                 float_targets=False))
    one = logit_error(GPTQConfig(bits=4, group_size=32, calib_dtype="float32"))
    bf16 = logit_error(GPTQConfig(bits=4, group_size=32, calib_dtype="bfloat16"))
    assert two < 0.8 * rtn
    assert one < 1.1 * two and bf16 < 1.1 * two, (rtn, two, one, bf16)


def test_calib_dtype_option() -> None:
    assert calib_dtype(GPTQConfig(calib_dtype="float32"), "cpu") == torch.float32
    assert calib_dtype(GPTQConfig(calib_dtype="bfloat16"), "cpu") == torch.bfloat16
    assert calib_dtype(GPTQConfig(), "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ConfigError, match="calib_dtype must be"):
        GPTQConfig(calib_dtype="float16")


def test_phase_clock_and_single_linear_api_still_work() -> None:
    clock = PhaseClock()
    with clock("solve"):
        pass
    wall, cpu = clock.take()
    assert set(wall) == set(cpu) == {"solve"} and clock.take() == ({}, {})
    linear = nn.Linear(64, 8, bias=False)
    gptq = GPTQ(linear)
    gptq.add_batch(torch.randn(256, 64))
    result = gptq.quantize(GPTQConfig(bits=4, group_size=32))
    assert 0 < result.error < 0.05
