"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling them up
before rounding, and fold the inverse scale into the op that produces those activations.

Per group of Linears sharing one input (the architecture adapter's scale pairs: for Llama q/k/v
after the input norm, gate/up after the post-attention norm, o after v, down after up), a
per-channel scale ``s = x_mean^a`` (or, with
``duo``, ``x_mean^a / w_mean^(1-a)``) is searched over ``a`` in a grid. Then a clipping ratio per
row and group shrinks the quantization range where that lowers the output error.

Both searches score candidates by the exact output error of the Linears on all calibration
tokens, ``tr(dW H dW^T)`` with ``H = 2 X X^T / n``, instead of re-running the block on sampled
tokens; the clipping search uses the diagonal blocks of ``H`` (one group's columns at a time).
``s = 1`` is always a candidate, so the search can only improve on RTN under that measure.
The reported error is the relative output error of each Linear, in its scaled coordinates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from openpto.architectures import Architecture, ScalePair, architecture_of
from openpto.core.calibrate import (
    CompressionResult,
    LayerCallback,
    LinearReport,
    RunLayer,
    find_linears,
)
from openpto.core.hessian import HessianAccumulator
from openpto.core.quant.common import collect_inputs, relative_output_error, run_calibrated
from openpto.core.quant.configs import AWQConfig
from openpto.core.quant.primitives import (
    compute_qparams,
    fake_quantize,
    quantize_codes,
    resolve_group_size,
)
from openpto.core.quant.tensor import QuantizedWeight
from openpto.errors import UnsupportedModel

#: clipping ratios tried: 1.0 down to (but excluding) 1 - CLIP_MAX_SHRINK, in CLIP_GRID steps
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5


class ActStats:
    """Input Hessian and mean absolute activation per channel for one (shared) Linear input."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.hessian = HessianAccumulator(columns, device=device)
        self.abs_sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, self.abs_sum.shape[0]).float()
        self.hessian.add_batch(flat)
        self.abs_sum += flat.abs().sum(0, dtype=torch.float64)
        self.tokens += flat.shape[0]

    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.tokens, 1)).float()


Expand = Callable[[torch.Tensor], torch.Tensor]


def channel_maps(
    layer: nn.Module, group: ScalePair, channels: int, width: int
) -> tuple[Expand, Expand] | None:
    """Maps between ``prev``'s ``channels`` outputs and the Linears' ``width`` inputs: expand a
    scale to the inputs, and reduce a per-input statistic to the channels. ``None`` when the
    layout is not understood, in which case the group is not scaled."""
    if channels == width:
        return (lambda s: s), (lambda v: v)
    head_dim = (
        getattr(layer.get_submodule(group.attention), "head_dim", None) if group.attention else None
    )
    if not head_dim or width % channels or channels % head_dim:
        return None
    kv, rep = channels // head_dim, width // channels
    # Query head h reads kv head h // rep (transformers' repeat_kv order).
    return (
        lambda s: s.view(kv, 1, head_dim).expand(kv, rep, head_dim).reshape(-1),
        lambda v: v.view(kv, rep, head_dim).mean(1).reshape(-1),
    )


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    delta = w - w_hat
    return ((delta @ H) * delta).sum()


def search_scale(
    weights: list[torch.Tensor],
    H: torch.Tensor,
    x_mean: torch.Tensor,
    config: AWQConfig,
    group_size: int,
    expand: Expand,
    reduce: Expand,
) -> tuple[torch.Tensor, float | None]:
    """Best channel scale for Linears sharing one input, and its alpha (``None``: s = 1 won)."""
    if config.duo:
        # Weight magnitude relative to its group's max, averaged over every output row.
        rel = [
            (
                w.abs().view(w.shape[0], -1, group_size)
                / w.abs().view(w.shape[0], -1, group_size).amax(-1, keepdim=True).clamp_min(1e-12)
            )
            .view(w.shape)
            .mean(0)
            for w in weights
        ]
        w_mean = reduce(torch.stack(rel).mean(0)).clamp_min(1e-4)

    def loss(s: torch.Tensor) -> torch.Tensor:
        se = expand(s)
        total = torch.zeros((), device=H.device)
        for w in weights:
            w_hat = fake_quantize(w * se, config.bits, group_size, config.symmetric) / se
            total = total + output_error(w, w_hat, H)
        return total

    ones = torch.ones_like(x_mean)
    best_s, best_alpha, best = ones, None, loss(ones)
    x = x_mean.clamp_min(1e-4)
    for step in range(config.grid):
        alpha = step / config.grid
        s = x.pow(alpha)
        if config.duo:
            s = s / w_mean.pow(1 - alpha)
        s = s.clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        current = loss(s)
        if current < best:
            best_s, best_alpha, best = s, alpha, current
    return best_s, best_alpha


def search_clip(
    w: torch.Tensor, H: torch.Tensor, config: AWQConfig, group_size: int
) -> torch.Tensor:
    """Per row and group, the range-shrink ratio with the lowest output error (block-diagonal H)."""
    rows, cols = w.shape
    groups = cols // group_size
    idx = torch.arange(groups, device=w.device)
    blocks = H.view(groups, group_size, groups, group_size)[idx, :, idx, :]  # [G, g, g]
    wg = w.view(rows, groups, group_size)
    best_err = torch.full((rows, groups), float("inf"), device=w.device)
    best_ratio = torch.ones(rows, groups, device=w.device)
    for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        ratio = 1 - step / CLIP_GRID
        delta = wg - fake_quantize(w, config.bits, group_size, config.symmetric, ratio).view_as(wg)
        err = torch.einsum("rgi,gij,rgj->rg", delta, blocks, delta)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


@torch.no_grad()
def fold_scale(
    prev: nn.Module,
    linears: list[nn.Linear],
    s: torch.Tensor,
    expand: Expand,
    rows: slice = slice(None),
    norm_offset: float = 0.0,
) -> None:
    """Divide ``prev``'s output channels (its ``rows``, for part of a fused Linear) by ``s`` and
    multiply the Linears' inputs by it: the layer computes the same function, with the salient
    weights now larger. A norm computing ``x_hat * (norm_offset + w)`` gets
    ``w' = (norm_offset + w) / s - norm_offset`` (Gemma's ``1 + w``)."""
    weight = getattr(prev, "weight", None)
    if isinstance(prev, nn.Linear):
        w = prev.weight.data.float()
        w[rows] = w[rows] / s.unsqueeze(1)
        prev.weight.data = w.to(prev.weight.dtype)
    elif isinstance(weight, torch.Tensor) and weight.dim() == 1:
        # Computed in float32; stored in a 16-bit dtype, a w' near -1 keeps fewer significant
        # bits of 1 + w' than a Llama norm keeps of w', so bfloat16 Gemma folds round more.
        weight.data = ((weight.data.float() + norm_offset) / s - norm_offset).to(weight.dtype)
    else:
        raise UnsupportedModel(f"cannot fold an AWQ scale into a {type(prev).__name__}")
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor):
        b = bias.data.float()
        b[rows] = b[rows] / s
        bias.data = b.to(bias.dtype)
    se = expand(s)
    for linear in linears:
        linear.weight.data = (linear.weight.data.float() * se).to(linear.weight.dtype)


class AWQCompressor:
    def __init__(self, config: AWQConfig, architecture: Architecture, model_config: Any) -> None:
        self.config = config
        self.architecture = architecture
        self.model_config = model_config

    def compress_layer(
        self, index: int, prefix: str, layer: nn.Module, run_layer: RunLayer
    ) -> list[LinearReport]:
        cfg = self.config
        linears = find_linears(layer)
        gsize = {
            n: resolve_group_size(lin.in_features, cfg.group_size) for n, lin in linears.items()
        }
        stats_of = collect_inputs(linears, run_layer, ActStats)

        seconds = dict.fromkeys(linears, 0.0)
        alphas: dict[str, float | None] = {}
        input_scale: dict[str, torch.Tensor] = {}
        plan = []
        arch = self.architecture
        for group in arch.scale_pairs:
            if not all(n in linears for n in group.linears):
                continue
            started = time.perf_counter()
            members = [linears[n] for n in group.linears]
            prev = layer.get_submodule(group.prev)
            rows = (
                arch.rows(self.model_config, group.prev, group.prev_part)
                if group.prev_part else slice(None)
            )
            channels = len(range(int(prev.get_parameter("weight").shape[0]))[rows])
            maps = channel_maps(layer, group, channels, members[0].in_features)
            if maps is None:
                continue
            stats = stats_of[group.linears[0]]
            s, alpha = search_scale(
                [m.weight.data.float() for m in members],
                stats.hessian.H,
                maps[1](stats.mean_abs()),
                cfg,
                gsize[group.linears[0]],
                *maps,
            )
            plan.append((prev, members, s, maps[0], rows))
            for n in group.linears:
                alphas[n] = alpha
                input_scale[n] = maps[0](s)
                seconds[n] += (time.perf_counter() - started) / len(group.linears)
        # Fold only after every search: each search saw the original weights, and scaling a
        # Linear's rows (as prev of the next group) does not change its per-row rounding.
        for prev, members, s, expand, rows in plan:
            fold_scale(prev, members, s, expand, rows, arch.norm_offset)

        reports = []
        for name, linear in linears.items():
            started = time.perf_counter()
            w = linear.weight.data.float()
            H = stats_of[name].hessian.H
            if name in input_scale:
                se = input_scale[name]
                H = H / (se.unsqueeze(1) * se.unsqueeze(0))
            g = gsize[name]
            ratio = (
                search_clip(w, H, cfg, g) if cfg.clip and name not in arch.no_clip else None
            )
            scale, zero = compute_qparams(w, cfg.bits, g, cfg.symmetric, ratio)
            qw = QuantizedWeight(
                quantize_codes(w, scale, zero, cfg.bits, g), scale, zero, cfg.bits, g, cfg.symmetric
            )
            w_hat = qw.dequantize()
            linear.weight.data = w_hat.to(linear.weight.dtype)
            reports.append(
                LinearReport(
                    index,
                    f"{prefix}.{name}",
                    relative_output_error(w, w_hat, H),
                    seconds[name] + time.perf_counter() - started,
                    quantized=qw.to("cpu"),
                    extra={"alpha": alphas.get(name)},
                )
            )
        return reports


def awq_transform(
    model: nn.Module,
    config: AWQConfig,
    calibration: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    on_layer: LayerCallback | None = None,
) -> CompressionResult:
    compressor = AWQCompressor(config, architecture_of(model), getattr(model, "config", None))
    return run_calibrated(model, config, calibration, compressor, device=device, on_layer=on_layer)
