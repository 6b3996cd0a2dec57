"""RTN, GPTQ and AWQ on random matrices and tiny random Llamas; configs and the quantize_ API."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from openpto.api import quantize_
from openpto.architectures import architecture
from openpto.config import config_from_dict
from openpto.core.calibrate import decoder_layers, find_linears
from openpto.core.quant import AWQConfig, GPTQConfig, RTNConfig
from openpto.core.quant.awq import channel_maps, fold_scale
from openpto.core.quant.gptq import GPTQ
from openpto.core.quant.primitives import compute_qparams, sqnr_db
from openpto.core.quant.tensor import quantize_weight
from openpto.errors import ConfigError, DataError, UnsupportedModel
from openpto.registry import TRANSFORMS
from tests.helpers import tiny_llama


def correlated_inputs(tokens: int, columns: int, seed: int) -> torch.Tensor:
    """Activations with correlated channels and a few large ones, like a real residual stream."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(columns, columns, generator=g) / columns**0.5
    scale = torch.ones(columns)
    scale[torch.randperm(columns, generator=g)[:4]] = 8.0
    return (
        torch.randn(tokens, columns, generator=g) @ mix
        + 0.1 * torch.randn(tokens, columns, generator=g)
    ) * scale


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x.double() @ (w.double() - w_hat.double()).T) ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "config",
    [
        GPTQConfig(bits=4, group_size=32),
        GPTQConfig(bits=4, group_size=64, act_order=False, static_groups=False),
        GPTQConfig(bits=3, group_size=None, symmetric=True),
    ],
    ids=["actorder-static-g32", "inorder-g64", "w3-perchannel-sym"],
)
def test_gptq_beats_rtn_on_the_same_layer_and_data(seed: int, config: GPTQConfig) -> None:
    torch.manual_seed(seed)
    linear = nn.Linear(128, 48, bias=False)
    x = correlated_inputs(1024, 128, seed)
    gptq = GPTQ(linear)
    for chunk in x.split(256):
        gptq.add_batch(chunk)
    result = gptq.quantize(config)
    w = linear.weight.data
    rtn = quantize_weight(w, config.bits, config.group_size, config.symmetric).dequantize()
    ours, baseline = output_error(w, result.quantized.dequantize(), x), output_error(w, rtn, x)
    assert ours < 0.8 * baseline
    # The reported error is the relative output error on those inputs.
    assert result.error == pytest.approx(
        ours / float(((x.double() @ w.double().T) ** 2).sum()), rel=1e-3
    )
    gptq.free()
    assert gptq.hessian is None


def test_act_order_static_groups_keep_codes_in_original_order() -> None:
    # With a diagonal Hessian no error propagates, so GPTQ must give exactly the RTN codes with
    # the static (original-order) grid, however act-order permutes the pass.
    torch.manual_seed(0)
    linear = nn.Linear(128, 32, bias=False)
    gptq = GPTQ(linear)
    assert gptq.hessian is not None
    gptq.hessian.H = torch.diag(torch.rand(128) * 10 + 0.1)
    result = gptq.quantize(GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True))
    assert result.perm is not None and not torch.equal(result.perm, torch.arange(128))
    rtn = quantize_weight(linear.weight.data, 4, 32, False)
    assert torch.equal(result.quantized.q, rtn.q)
    assert torch.equal(result.quantized.scale, rtn.scale) and torch.equal(
        result.quantized.zero, rtn.zero
    )


def test_act_order_grid_is_the_original_weights_grid() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(64, 16, bias=False)
    gptq = GPTQ(linear)
    gptq.add_batch(correlated_inputs(512, 64, 1))
    result = gptq.quantize(GPTQConfig(bits=4, group_size=32))
    scale, zero = compute_qparams(linear.weight.data, 4, 32, False)
    assert torch.equal(result.quantized.scale, scale) and torch.equal(result.quantized.zero, zero)


def test_gptq_handles_dead_columns() -> None:
    torch.manual_seed(2)
    linear = nn.Linear(64, 16, bias=False)
    x = correlated_inputs(512, 64, 2)
    x[:, [3, 40]] = 0
    gptq = GPTQ(linear)
    gptq.add_batch(x)
    result = gptq.quantize(GPTQConfig(bits=4, group_size=32))
    deq = result.quantized.dequantize()
    assert torch.isfinite(deq).all() and result.error < 0.05
    # A dead input gets plain rounding: its weights are kept for inputs that do fire later.
    rtn = quantize_weight(linear.weight.data, 4, 32, False)
    assert torch.equal(result.quantized.q[:, [3, 40]], rtn.q[:, [3, 40]])


def test_gptq_on_a_tiny_llama_beats_rtn_end_to_end() -> None:
    # 4096 calibration tokens: with a few hundred, GPTQ overfits 256-wide Hessians.
    calib = torch.randint(0, 512, (32, 128), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    base = tiny_llama(hidden_size=128, intermediate_size=256)
    with torch.no_grad():
        ref = base(held_out).logits
    errors = {}
    events = []
    for cfg in (
        RTNConfig(bits=4, group_size=32, symmetric=False),
        GPTQConfig(bits=4, group_size=32),
    ):
        model = copy.deepcopy(base)
        result = quantize_(model, cfg, calib, on_layer=events.append)
        assert len(result.reports) == 2 * 7 and result.method == cfg.type_name
        assert result.config == cfg.to_dict()
        # The model now computes with exactly the dequantized codes.
        for name, qw in result.quantized_weights().items():
            assert torch.equal(model.get_submodule(name).weight.data, qw.dequantize())
        with torch.no_grad():
            errors[cfg.type_name] = float((model(held_out).logits - ref).pow(2).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"]
    assert [e.index for e in events] == [0, 1, 0, 1]


def test_rtn_int8_per_channel_sqnr_above_40db() -> None:
    model = tiny_llama()
    before = {
        n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    result = quantize_(model, RTNConfig(bits=8, group_size=None, symmetric=True))
    assert len(result.reports) == 2 * 7
    for report in result.reports:
        w = before[report.name]
        assert sqnr_db(w, model.get_submodule(report.name).weight.data) > 40
        assert report.error == pytest.approx(
            float((w - report.quantized.dequantize()).pow(2).sum() / w.pow(2).sum())
        )
    assert torch.equal(model.lm_head.weight, before["lm_head"])  # outside the decoder layers


# ---------------------------------------------------------------------------------------------
# AWQ


def test_awq_fold_keeps_the_model_function() -> None:
    # Fold random scales (no quantization) into every group, GQA's v -> o included.
    model = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        ref = model(ids).logits
    _, layers = decoder_layers(model)
    folded = 0
    for layer in layers:
        linears = find_linears(layer)
        for group in architecture("llama").scale_pairs:
            prev = layer.get_submodule(group.prev)
            members = [linears[n] for n in group.linears]
            channels = int(prev.get_parameter("weight").shape[0])
            maps = channel_maps(layer, group, channels, members[0].in_features)
            assert maps is not None
            fold_scale(prev, members, torch.rand(channels) * 4 + 0.1, maps[0])
            folded += 1
    assert folded == 2 * 4
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def _outlier_llama() -> nn.Module:
    """A tiny Llama whose norms emit a few channels 30x larger: activation outliers."""
    model = tiny_llama(hidden_size=128, intermediate_size=256, seed=3)
    g = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[torch.randperm(128, generator=g)[:6]] = 30.0
    return model


@pytest.mark.parametrize("duo", [False, True])
def test_awq_lowers_output_error_vs_rtn_on_outlier_activations(duo: bool) -> None:
    calib = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    held_out = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    base = _outlier_llama()
    with torch.no_grad():
        ref = base(held_out).logits
    rtn, awq = copy.deepcopy(base), copy.deepcopy(base)
    rtn_result = quantize_(rtn, RTNConfig(bits=4, group_size=32, symmetric=False))
    awq_result = quantize_(awq, AWQConfig(bits=4, group_size=32, duo=duo), calib)
    with torch.no_grad():
        rtn_err = float((rtn(held_out).logits - ref).pow(2).mean())
        awq_err = float((awq(held_out).logits - ref).pow(2).mean())
    assert awq_err < 0.7 * rtn_err
    alphas = [r.extra["alpha"] for r in awq_result.reports if r.name.endswith("q_proj")]
    assert any(a is not None and a > 0 for a in alphas)  # the outliers were acted on
    assert len(rtn_result.reports) == len(awq_result.reports) == 14
    # The artifact's codes are of the scaled weights that the plain model now holds.
    for name, qw in awq_result.quantized_weights().items():
        assert torch.equal(awq.get_submodule(name).weight.data, qw.dequantize())


def test_awq_refuses_unknown_model_types() -> None:
    model = tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedModel, match="no architecture adapter for model type 'mystery'"):
        quantize_(model, AWQConfig(), torch.randint(0, 512, (2, 8)))
    assert architecture("qwen2").scale_pairs == architecture("llama").scale_pairs


# ---------------------------------------------------------------------------------------------
# Configs and the API


def test_every_registered_config_round_trips() -> None:
    from openpto.api import load_methods
    from openpto.config import registered_config_types

    load_methods()
    registered = registered_config_types()
    configs = [cls() for cls in registered.values()]
    assert {RTNConfig, GPTQConfig, AWQConfig} <= {type(c) for c in configs}
    assert set(TRANSFORMS.keys()) <= set(registered.values())
    configs += [
        RTNConfig(bits=4, group_size=64, symmetric=False),
        AWQConfig(duo=True, group_size=None),
    ]
    for cfg in configs:
        data = cfg.to_dict()
        assert data["type"] == cfg.type_name and data["version"] == type(cfg).version
        assert config_from_dict(data) == cfg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 9}, "bits must be an integer from 2 to 8"),
        ({"bits": 1}, "bits must be"),
        ({"group_size": 48}, "group size must be one of 32, 64, 128"),
        ({"act_order": True, "static_groups": False}, "needs static_groups"),
        ({"damp": 0.0}, "damp"),
    ],
)
def test_bad_gptq_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GPTQConfig(**kwargs)


def test_quantize_errors() -> None:
    model = tiny_llama()
    with pytest.raises(DataError, match="gptq needs calibration"):
        quantize_(model, GPTQConfig())
    with pytest.raises(ConfigError, match="group sizes that do: 32, 64"):
        quantize_(
            tiny_llama(hidden_size=192, intermediate_size=384), RTNConfig(bits=4, group_size=128)
        )
    layerless = tiny_llama()
    for layer in layerless.model.layers:
        layer.self_attn = nn.Identity()
        layer.mlp = nn.Identity()
    with pytest.raises(UnsupportedModel, match="no Linear layers"):
        quantize_(layerless, RTNConfig())
