from __future__ import annotations

import pytest
import torch

from openpto.config import config_from_dict
from openpto.core.calibrate import find_linears
from openpto.core.hessian import HessianAccumulator
from openpto.core.sparsity import (
    MagnitudeConfig,
    SparseGPTConfig,
    WandaConfig,
    layer_mask,
    nm_compliant,
    nm_mask,
    row_mask,
    sparsegpt,
    sparsify_model,
    speedup_bounds,
    summarize,
)
from openpto.core.sparsity.transforms import SquaredNorms, collect_inputs
from openpto.errors import ConfigError, DataError
from openpto.registry import TRANSFORMS
from tests.helpers import tiny_llama

CALIB = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sparsity": 0.0},
        {"sparsity": 1.0},
        {"sparsity": 1.5},
        {"sparsity": -0.2},
        {"sparsity": float("nan")},
        {"pattern": "4:4"},
        {"pattern": "5:4"},
        {"pattern": "0:4"},
        {"pattern": "2-4"},
        {"pattern": "2:4", "sparsity": 0.5},
    ],
)
def test_bad_configs_raise_config_error(kwargs: dict) -> None:
    for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig):
        with pytest.raises(ConfigError):
            cls(**kwargs)


def test_other_bad_configs() -> None:
    with pytest.raises(ConfigError, match="scope"):
        MagnitudeConfig(scope="column")
    with pytest.raises(ConfigError, match="bits"):
        SparseGPTConfig(bits=1)
    with pytest.raises(ConfigError, match="group_size only applies"):
        SparseGPTConfig(group_size=64)
    with pytest.raises(ConfigError, match="group size"):
        SparseGPTConfig(bits=4, group_size=48)


def test_width_not_divisible_by_m_is_refused() -> None:
    model = tiny_llama(num_hidden_layers=1)  # widths 64 and 128
    with pytest.raises(ConfigError, match=r"input width 64 is not divisible by M=6 of pattern 1:6"):
        sparsify_model(model, MagnitudeConfig(pattern="1:6"))


def test_defaults_and_round_trip() -> None:
    assert MagnitudeConfig().sparsity == 0.5
    assert WandaConfig(pattern="2:4").target_sparsity == 0.5
    assert SparseGPTConfig(pattern="4:8").nm == (4, 8)
    configs = [
        MagnitudeConfig(sparsity=0.3, scope="row"),
        WandaConfig(pattern="2:4"),
        SparseGPTConfig(sparsity=0.6, bits=4, group_size=64, symmetric=True),
    ]
    for cfg in configs:
        assert config_from_dict(cfg.to_dict()) == cfg
        assert cfg in [config_from_dict(cfg.to_dict())]
        assert type(cfg) in TRANSFORMS


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_masks_are_exact(n: int, m: int) -> None:
    scores = torch.randn(96, 128).abs()
    mask = nm_mask(scores, n, m)
    assert (mask.reshape(-1, m).sum(dim=1) == n).all()
    assert nm_compliant(mask, n, m)
    # The kept entries are the n largest of each group.
    kept_min = torch.where(mask, scores, torch.inf).reshape(-1, m).amin(dim=1)
    pruned_max = torch.where(mask, -torch.inf, scores).reshape(-1, m).amax(dim=1)
    assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.777])
@pytest.mark.parametrize("shape", [(37, 53), (64, 576), (7, 9)])
def test_unstructured_masks_hit_the_requested_sparsity(sparsity: float, shape: tuple) -> None:
    scores = torch.randn(*shape)
    for mask in (layer_mask(scores, sparsity), row_mask(scores, sparsity)):
        measured = 1 - mask.float().mean().item()
        assert abs(measured - sparsity) <= max(0.001, 0.5 / scores.numel())
    # Row masks compare within rows: per-row counts differ by at most one.
    per_row = (~row_mask(scores, sparsity)).sum(dim=1)
    assert int(per_row.max() - per_row.min()) <= 1


def _layer_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """float64 inputs of every Linear of layer 0 on CALIB, from a plain forward pass."""
    seen: dict[str, list[torch.Tensor]] = {}
    layer = model.model.layers[0]
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].double())
        )
        for name, m in find_linears(layer).items()
    ]
    with torch.no_grad():
        model(CALIB, use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]) for k, v in seen.items()}


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_wanda_matches_float64_hand_computation(pattern: str | None) -> None:
    model = tiny_llama(num_hidden_layers=2)
    reference = tiny_llama(num_hidden_layers=2)
    inputs = _layer_inputs(reference)
    cfg = WandaConfig(pattern=pattern) if pattern else WandaConfig(sparsity=0.5)
    result = sparsify_model(model, cfg, CALIB, batch_size=4)
    masks = result.masks()
    for name, linear in find_linears(reference.model.layers[0]).items():
        x = inputs[name]
        scores = linear.weight.double().abs() * x.norm(dim=0).unsqueeze(0)
        expected = nm_mask(scores, 2, 4) if pattern else row_mask(scores, 0.5)
        got = masks[f"model.layers.0.{name}"]
        assert torch.equal(got, expected), name
        pruned = model.model.layers[0].get_submodule(name).weight
        assert torch.equal(pruned, linear.weight * got)


def test_inputs_are_shared_between_linears_reading_the_same_tensor() -> None:
    model = tiny_llama(num_hidden_layers=1)
    layer = model.model.layers[0]
    linears = find_linears(layer)
    hidden = model.model.embed_tokens(CALIB)
    position = model.model.rotary_emb(hidden, torch.arange(CALIB.shape[1]).unsqueeze(0))

    def run() -> None:
        with torch.no_grad():
            layer(hidden, position_embeddings=position, attention_mask=None)

    stats = collect_inputs(linears, run, HessianAccumulator)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    norms = collect_inputs(linears, run, SquaredNorms)
    for name in linears:
        torch.testing.assert_close(
            norms[name].column_norms(), stats[name].column_norms(), rtol=1e-4, atol=1e-5
        )


def _correlated_problem(out: int = 48, width: int = 64, tokens: int = 2048):
    """Inputs like an LLM's: mildly correlated channels, a few of them outliers (8x)."""
    g = torch.Generator().manual_seed(3)
    mixing = torch.eye(width) + 0.5 * torch.randn(width, width, generator=g) / width**0.5
    scales = torch.ones(width)
    scales[torch.randperm(width, generator=g)[:4]] = 8.0
    x = (torch.randn(tokens, width, generator=g) * scales) @ mixing
    w = torch.randn(out, width, generator=g)
    acc = HessianAccumulator(width)
    acc.add_batch(x)
    return w, x, acc


def _output_error(w: torch.Tensor, w_new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w.double() - w_new.double()) @ x.double().T).pow(2).sum())


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda(pattern: tuple[int, int] | None) -> None:
    w, x, acc = _correlated_problem()
    if pattern:
        result = sparsegpt(w, acc.H, nm=pattern, block_size=32)
        magnitude = nm_mask(w.abs(), *pattern)
        wanda = nm_mask(w.abs() * acc.column_norms(), *pattern)
        assert nm_compliant(result.weight, *pattern)
    else:
        result = sparsegpt(w, acc.H, sparsity=0.5, block_size=32)
        magnitude = layer_mask(w.abs(), 0.5)
        wanda = row_mask(w.abs() * acc.column_norms(), 0.5)
    assert torch.equal(result.weight == 0, ~result.mask)
    assert (result.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    ours = _output_error(w, result.weight, x)
    by_magnitude = _output_error(w, w * magnitude, x)
    by_wanda = _output_error(w, w * wanda, x)
    assert ours < 0.8 * by_wanda
    assert by_wanda < 0.8 * by_magnitude


@pytest.mark.parametrize(
    ("sparsity", "pattern", "group", "symmetric"),
    [(0.5, None, 32, False), (None, (2, 4), 64, True), (0.6, None, None, False)],
)
def test_joint_mode_keeps_pruned_entries_exactly_zero(sparsity, pattern, group, symmetric) -> None:
    w, x, acc = _correlated_problem(out=32, width=128)
    result = sparsegpt(
        w, acc.H, sparsity=sparsity, nm=pattern, bits=4, group_size=group, symmetric=symmetric
    )
    qw = result.quantized
    assert qw is not None and qw.bits == 4
    deq = qw.dequantize()
    assert (deq[~result.mask] == 0).all()
    torch.testing.assert_close(deq, result.weight, rtol=0, atol=0)
    # Pruned codes sit exactly on the zero-point.
    zero = qw.zero.repeat_interleave(qw.group_size, dim=1)
    assert torch.equal(qw.q[~result.mask].float(), zero[~result.mask])
    expected = 0.5 if pattern else sparsity
    assert (deq == 0).float().mean().item() >= expected - 1e-3
    # Joint compression still beats pruning by magnitude and then rounding to the same grid.
    from openpto.core.quant.tensor import quantize_weight

    naive = quantize_weight(w * layer_mask(w.abs(), expected), 4, group, symmetric).dequantize()
    assert _output_error(w, deq, x) < _output_error(w, naive, x)


@pytest.mark.parametrize(
    "cfg",
    [
        MagnitudeConfig(sparsity=0.5),
        MagnitudeConfig(sparsity=0.3, scope="row"),
        MagnitudeConfig(pattern="4:8"),
        WandaConfig(sparsity=0.7),
        SparseGPTConfig(pattern="2:4", block_size=32),
        SparseGPTConfig(sparsity=0.5, bits=4, group_size=32),
    ],
)
def test_sparsify_model_prunes_every_decoder_linear(cfg) -> None:
    model = tiny_llama(num_hidden_layers=2)
    events = []
    result = sparsify_model(model, cfg, CALIB, on_layer=events.append, batch_size=4)
    assert [e.index for e in events] == [0, 1]
    assert len(result.reports) == 14
    weights = [(r.name, model.get_submodule(r.name).weight) for r in result.reports]
    summary = summarize(weights, cfg.nm)
    mask_sparsity = sum(int((~r.mask).sum()) for r in result.reports) / summary.params
    assert abs(mask_sparsity - cfg.target_sparsity) <= 0.001
    if getattr(cfg, "bits", None) is None:
        assert summary.sparsity == mask_sparsity
    else:  # kept weights may also round to zero on the quantization grid
        assert mask_sparsity <= summary.sparsity < mask_sparsity + 0.02
    if cfg.nm:
        assert summary.nm_compliant
    for report in result.reports:
        weight = model.get_submodule(report.name).weight
        assert (weight[~report.mask] == 0).all()
        assert (report.quantized is not None) == (getattr(cfg, "bits", None) is not None)
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()
    with torch.no_grad():
        assert torch.isfinite(model(CALIB[:2]).logits).all()


def test_data_methods_need_calibration() -> None:
    with pytest.raises(DataError, match="calibration"):
        sparsify_model(tiny_llama(num_hidden_layers=1), WandaConfig())


def test_storage_counts_and_speedup_bounds() -> None:
    w = torch.randn(64, 128) * nm_mask(torch.randn(64, 128), 2, 4)
    dense = torch.randn(64, 128)
    summary = summarize([("a", w)], (2, 4))
    assert summary.zeros == 64 * 64 and summary.nm_compliant
    # bf16: half the values (8192 * 2 bytes) + 2 bits per kept value (4096 * 2 / 8).
    assert summary.semi_structured_bytes == 4096 * 2 + 1024
    assert summary.bitmask_bytes == 4096 * 2 + 8192 // 8
    assert summarize([("a", w), ("b", dense)]).semi_structured_bytes is None
    small = speedup_bounds(4096, 14336, 1, layout="2:4")
    assert small.compute_bound == 2.0
    assert 1.7 < small.memory_bound < 1.78  # 1 / 0.5625, less the activations
    big = speedup_bounds(4096, 14336, 2048, layout="2:4", peak_flops=750e12, bandwidth=4.25e12)
    assert big.roofline == pytest.approx(2.0, rel=0.01)  # compute-bound at 2048 tokens
    assert speedup_bounds(4096, 4096, 1, layout="unstructured", sparsity=0.5).memory_bound < 1.8
