from __future__ import annotations

import pytest
import torch
from torch import nn

from openpto.core.quant.tensor import quantize_weight
from openpto.core.sparsity import nm_mask
from openpto.kernels import sparse24
from openpto.registry import KERNELS

CUDA = torch.cuda.is_available() and torch.backends.cusparselt.is_available()


def _pruned_linear(out: int = 64, width: int = 128, dtype=torch.float32, device="cpu") -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(width, out, bias=False)
    with torch.no_grad():
        linear.weight.mul_(nm_mask(linear.weight.abs(), 2, 4))
    return linear.to(device=device, dtype=dtype)


def test_cpu_reasons_are_explicit() -> None:
    linear = _pruned_linear()
    assert "need CUDA" in (sparse24.unavailable(linear.weight) or "")
    model = nn.Sequential(linear, nn.Linear(128, 64))
    outcome = sparse24.swap_to_sparse24(model)
    assert set(outcome) == {"0", "1"}
    assert all(v.startswith("dense: ") for v in outcome.values())
    assert isinstance(model[0], nn.Linear)  # nothing was swapped
    qw = quantize_weight(linear.weight.detach(), 4, 32, True)
    kernel = KERNELS.get(sparse24.KERNEL_NAME)
    assert "need CUDA" in kernel.unavailable(qw, torch.device("cpu"), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA with cuSPARSELt")
def test_sparse24_linear_matches_dense_on_both_paths() -> None:
    linear = _pruned_linear(256, 512, torch.bfloat16, "cuda")
    dense = nn.Linear(512, 256, bias=False).to("cuda", torch.bfloat16)
    dense.weight.data.copy_(linear.weight.data)
    model = nn.Sequential(linear)
    outcome = sparse24.swap_to_sparse24(model, min_tokens=64, tune=False)
    assert outcome == {"0": sparse24.KERNEL_NAME}
    for tokens in (3, 64, 200):  # dense path, sparse path, sparse path with padding
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(model(x), dense(x), rtol=2e-2, atol=2e-2)
    not_24 = nn.Sequential(nn.Linear(512, 256).to("cuda", torch.bfloat16))
    assert "not 2:4" in sparse24.swap_to_sparse24(not_24)["0"]
    # Tuned: kept only if measured faster; either way the outcome says which and why.
    fresh = nn.Sequential(_pruned_linear(256, 512, torch.bfloat16, "cuda"))
    tuned = sparse24.swap_to_sparse24(fresh)["0"]
    assert tuned in (sparse24.KERNEL_NAME, "dense: measured no faster than dense at 1024 tokens")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA with cuSPARSELt")
def test_captured_call_replays_the_sparse_path() -> None:
    layer = sparse24.Sparse24Linear(_pruned_linear(256, 512, torch.bfloat16, "cuda"), min_tokens=8)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    captured = sparse24.CapturedCall(layer, x)
    y = torch.randn_like(x)
    torch.testing.assert_close(captured(y), layer(y), rtol=0, atol=0)


def test_swap_artifact_only_considers_24_artifacts() -> None:
    model = nn.Sequential(_pruned_linear())
    assert sparse24.swap_artifact(model, {"sparsity": {"pattern": "unstructured"}}) == {}
    assert sparse24.swap_artifact(model, {}) == {}
    outcome = sparse24.swap_artifact(model, {"sparsity": {"pattern": "2:4", "layers": {"0": 0.5}}})
    assert list(outcome) == ["0"] and "need CUDA" in outcome["0"]
