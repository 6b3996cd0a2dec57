"""GPTQ fitted to the float model's outputs: the float stream of the driver and the refit."""

from __future__ import annotations

import copy

import pytest
import torch

from openpto.core.calibrate import run_linear_sequential
from openpto.core.hessian import input_shift, refit_to_float_outputs
from openpto.core.quant import GPTQConfig
from openpto.errors import ConfigError
from tests.helpers import RoundingCompressor, linear_inputs, quantized_logit_error, tiny_llama


def test_refit_minimises_the_ridge_objective_against_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    x_float = torch.randn(4096, 48, generator=gen) @ torch.randn(48, 48, generator=gen)
    # upstream error a linear map can mostly undo, plus some that none can
    mix = torch.eye(48) + 0.2 * torch.randn(48, 48, generator=gen) / 48**0.5
    x = x_float @ mix + 0.05 * torch.randn(4096, 48, generator=gen)
    w = torch.randn(24, 48, generator=gen)
    H = 2 * x.t() @ x / x.shape[0]
    shift = input_shift(x_float, x, torch.float32)
    torch.testing.assert_close(shift, 2 * (x_float - x).t() @ x / x.shape[0], rtol=1e-5, atol=1e-4)
    damp = 0.01
    refit = refit_to_float_outputs(w, H, shift, damp)
    # float64 normal equations of argmin ||W Xf - V X||^2 / n * 2 + lam ||V - W||^2
    xd, xfd, wd = x.double(), x_float.double(), w.double()
    Hd = 2 * xd.t() @ xd / xd.shape[0]
    lam = damp * Hd.diagonal().mean()
    rhs = wd @ (2 * xfd.t() @ xd / xd.shape[0]) + lam * wd
    reference = torch.linalg.solve(Hd + lam * torch.eye(48, dtype=torch.float64), rhs.t()).t()
    assert (refit.double() - reference).norm() / reference.norm() < 1e-5

    def output_error(v: torch.Tensor) -> float:
        return float((x_float.double() @ wd.t() - xd @ v.double().t()).norm())

    assert output_error(refit) < 0.3 * output_error(w)


def test_refit_keeps_weights_when_inputs_match_even_in_bfloat16() -> None:
    gen = torch.Generator().manual_seed(1)
    # one outlier channel, as in real activations: H spans orders of magnitude
    x = torch.randn(2048, 64, generator=gen) * torch.logspace(-1, 2, 64)
    w = torch.randn(8, 64, generator=gen)
    H = 2 * x.t() @ x / x.shape[0]
    shift = input_shift(x, x, torch.bfloat16)
    assert torch.equal(refit_to_float_outputs(w, H, shift, 0.01), w)
    # a small upstream error moves the weights a little, not wildly, in bfloat16 as in float32
    nudged = x * (1 + 0.01 * torch.randn(2048, 64, generator=gen))
    H = 2 * nudged.t() @ nudged / x.shape[0]
    moved = {dtype: refit_to_float_outputs(w, H, input_shift(x, nudged, dtype), 0.01)
             for dtype in (torch.float32, torch.bfloat16)}
    assert (moved[torch.float32] - w).norm() / w.norm() < 0.1
    assert (moved[torch.bfloat16] - moved[torch.float32]).norm() / w.norm() < 0.01


def test_float_stream_hands_each_linear_its_float_model_input() -> None:
    model = tiny_llama(num_hidden_layers=2)
    float_model = copy.deepcopy(model)
    calib = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(2))
    compressor = RoundingCompressor()
    events = []
    run_linear_sequential(model, calib, compressor, float_samples=3, on_layer=events.append)
    assert "float" in events[0].phases
    captured = linear_inputs(float_model, calib)
    assert set(compressor.float_inputs) == {n for n in captured if ".layers." in n}
    for name, seen in compressor.float_inputs.items():
        torch.testing.assert_close(seen, captured[name], rtol=1e-5, atol=1e-5)
    # The first Linear of layer 0 reads the same in both models; later ones carry the rounding.
    first = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(compressor.inputs[first], compressor.float_inputs[first])
    last = "model.layers.1.mlp.down_proj"
    assert not torch.allclose(compressor.inputs[last], compressor.float_inputs[last])


def test_float_targets_lower_the_logit_error_of_a_tiny_llama() -> None:
    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=4)
    calib = torch.randint(0, 512, (16, 256), generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(4))

    def logit_error(config: GPTQConfig) -> float:
        return quantized_logit_error(base, config, calib, ids)

    plain = logit_error(GPTQConfig(bits=3, group_size=32, calib_dtype="float32",
                                   float_targets=False))
    fitted = logit_error(GPTQConfig(bits=3, group_size=32, calib_dtype="float32",
                                    float_targets=True))
    subset = logit_error(GPTQConfig(bits=3, group_size=32, calib_dtype="float32",
                                    float_targets=True, float_target_samples=8))
    assert fitted < 0.95 * plain and subset < 0.95 * plain, (plain, fitted, subset)


def test_float_targets_need_the_one_pass_driver() -> None:
    with pytest.raises(ConfigError, match="float_targets needs true_sequential"):
        GPTQConfig(true_sequential=False)
    assert not GPTQConfig(true_sequential=False, float_targets=False).float_targets
    with pytest.raises(ConfigError, match="float_target_samples must be positive"):
        GPTQConfig(float_target_samples=0)


def test_refit_reports_an_indefinite_hessian_instead_of_refitting() -> None:
    w = torch.ones(2, 3)
    H = torch.diag(torch.tensor([1.0, 1.0, -5.0]))  # -5 is beyond any lam of 1% of the mean
    assert refit_to_float_outputs(w, H, torch.ones(3, 3), 0.01) is None
