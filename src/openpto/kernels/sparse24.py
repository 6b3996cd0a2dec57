"""2:4 semi-structured Linears on CUDA (cuSPARSELt), used only where they are faster.

cuSPARSELt halves the multiply-adds of a 2:4-pruned weight, which pays when the matmul is
compute-bound — prefill over many tokens. At small token counts (decode) it is slower than a
dense bf16 matmul (measured on an H200 at Llama-3-8B shapes: 0.26–0.48x at 1–128 tokens, 1.13–1.45x
from 1024 tokens for the 4096-wide and MLP layers, never faster for 1024x4096 up to 4096 tokens;
docs/benchmarks.md), so ``Sparse24Linear`` keeps the dense weight too and dispatches on the token
count: dense below ``min_tokens``, sparse at or above. The price is memory: dense plus
compressed is about 1.56x the dense weight. Eager calls cost host time (0.5–0.75 ms each for
cuSPARSELt, measured), so prefill should run inside a captured CUDA graph: ``CapturedCall``
records one call for fixed input shapes and replays it; the dispatch is a Python branch on the
shape, so it is fixed at capture time as it should be.

On CPU nothing here runs: torch has no CPU semi-structured kernel, and a 50% mask in a dense
matmul costs exactly what the dense one does (``benchmarks/sparsity_cpu.py`` measures it).

The ``sparse24-cusparselt`` kernel (registered in ``KERNELS``) runs a 2:4 *quantized* weight of
a joint sparse + quantized artifact the same way: dequantized to the activation dtype, dense
below the threshold and compressed above.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from openpto.core.sparsity.masks import nm_compliant
from openpto.errors import BackendUnavailable
from openpto.kernels.base import Kernel

if TYPE_CHECKING:
    from openpto.core.quant.tensor import QuantizedWeight
    from openpto.kernels.quant_linear import QuantLinear

KERNEL_NAME = "sparse24-cusparselt"
#: token count from which the compressed weight is used: the smallest measured count at which
#: every large Llama-3-8B layer shape ran faster sparse than dense on an H200 (1.20–1.45x with
#: torch's column-major output; row-major, as here, 0.66–1.05x at 1024–2048 tokens, so
#: swap_to_sparse24 times each shape before swapping it)
DEFAULT_MIN_TOKENS = 1024
_HALF = (torch.float16, torch.bfloat16)
# cuSPARSELt's shape rules for 16-bit weights: both dims multiples of 16; dense operand of 8.
_WEIGHT_MULTIPLE = 16
_DENSE_MULTIPLE = 8


def unavailable(weight: torch.Tensor) -> str | None:
    """Why ``weight`` cannot become a cuSPARSELt 2:4 weight, or ``None`` if it can."""
    if weight.device.type != "cuda":
        return f"2:4 semi-structured kernels need CUDA, the weight is on {weight.device.type}"
    if not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt"
    if weight.dtype not in _HALF:
        return f"cuSPARSELt 2:4 needs float16 or bfloat16 weights, got {weight.dtype}"
    rows, cols = weight.shape
    if rows % _WEIGHT_MULTIPLE or cols % _WEIGHT_MULTIPLE:
        return f"weight shape {tuple(weight.shape)} is not a multiple of {_WEIGHT_MULTIPLE}"
    if not nm_compliant(weight, 2, 4):
        return "the weight is not 2:4 sparse (some group of 4 has more than 2 non-zeros)"
    return None


def compress(weight: torch.Tensor) -> torch.Tensor:
    """The cuSPARSELt-compressed form of a 2:4 weight (a ``SparseSemiStructuredTensor``)."""
    reason = unavailable(weight)
    if reason is not None:
        raise BackendUnavailable(reason)
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    # cuSPARSELt is the only backend that runs on Hopper; CUTLASS's is limited to sm 8.x.
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    # No alg_id: torch 2.11 does not take it, and the default algorithm is what was measured.
    return to_sparse_semi_structured(weight.detach().contiguous())


def sparse_linear(x: torch.Tensor, packed: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., in] @ W^T`` with a compressed 2:4 ``W``, through torch's semi-structured op.

    The result must be row-major: torch 2.11's ``F.linear`` on the compressed tensor computes
    ``W @ x^T`` and hands back its transpose, a column-major ``[tokens, out]`` whose strided views
    slow every op after it (2.7x slower than dense end to end at 2048 tokens), and copying it
    row-major costs as much as the sparse matmul saves. So cuSPARSELt is asked to write the
    transposed product itself (``transpose_result``), which costs nothing extra.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    tokens = x2.shape[0]
    pad = (-tokens) % _DENSE_MULTIPLE
    if pad:
        x2 = F.pad(x2, (0, 0, 0, pad))
    compressed = getattr(packed, "packed", None)
    if compressed is not None and hasattr(torch, "_cslt_sparse_mm"):
        y = torch._cslt_sparse_mm(compressed, x2.t(), bias=bias, transpose_result=True)
    else:
        y = F.linear(x2, packed, bias).contiguous()
    if pad:
        y = y[:tokens]
    return y.reshape(*shape[:-1], y.shape[-1])


def pays_off(weight: torch.Tensor, packed: Any, tokens: int, repeats: int = 10) -> bool:
    """Whether the sparse matmul beats the dense one for this weight at ``tokens`` tokens,
    measured on the device (CUDA events, median of ``repeats`` after warm-up)."""
    x = torch.randn(tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)

    def median_ms(fn: Callable[[], torch.Tensor]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    with torch.no_grad():
        dense = median_ms(lambda: F.linear(x, weight))
        sparse = median_ms(lambda: sparse_linear(x, packed, None))
    # A margin: a tie is not worth the extra memory of the compressed copy.
    return sparse < 0.97 * dense


class Sparse24Linear(nn.Module):
    """A Linear with a 2:4 weight: dense matmul below ``min_tokens`` tokens, cuSPARSELt above."""

    kernel_name = KERNEL_NAME

    def __init__(self, linear: nn.Linear, min_tokens: int = DEFAULT_MIN_TOKENS,
                 packed: Any = None) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.min_tokens = min_tokens
        # The dense weight stays a parameter (it moves, counts and saves as usual); the compressed
        # copy is derived state, rebuilt by ``compress`` and never saved.
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = packed if packed is not None else compress(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features >= self.min_tokens:
            return sparse_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"min_tokens={self.min_tokens}, kernel={KERNEL_NAME}")


def swap_to_sparse24(
    model: nn.Module,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    names: list[str] | None = None,
    *,
    tune: bool = True,
) -> dict[str, str]:
    """Replace each 2:4-sparse ``nn.Linear`` (all of them, or ``names``) by a ``Sparse24Linear``.

    With ``tune`` (the default), each distinct weight shape is first timed dense against sparse
    at ``min_tokens`` tokens on the device, and shapes where sparse is not faster stay dense (on
    an H200 at 2048 tokens, Llama-3-8B's 1024x4096 k/v projections are 0.76x). Returns every
    considered Linear with ``"sparse24-cusparselt"`` or the reason it stayed dense — nothing is
    swapped or skipped silently.
    """
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = names if names is not None else list(linears)
    verdicts: dict[tuple[int, int, torch.dtype], bool] = {}
    outcome: dict[str, str] = {}
    for name in chosen:
        linear = linears[name]
        reason = unavailable(linear.weight)
        if reason is not None:
            outcome[name] = f"dense: {reason}"
            continue
        packed = compress(linear.weight.detach())
        key = (linear.out_features, linear.in_features, linear.weight.dtype)
        if tune and key not in verdicts:
            verdicts[key] = pays_off(linear.weight.detach(), packed, min_tokens)
        if tune and not verdicts[key]:
            outcome[name] = f"dense: measured no faster than dense at {min_tokens} tokens"
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Sparse24Linear(linear, min_tokens, packed))
        outcome[name] = KERNEL_NAME
    return outcome


def swap_artifact(model: nn.Module, metadata: dict[str, Any],
                  min_tokens: int = DEFAULT_MIN_TOKENS, tune: bool = True) -> dict[str, str]:
    """For a loaded ``opt sparsify`` artifact: put its 2:4 Linears on cuSPARSELt when the model
    is on CUDA in a half dtype (``openpto.json``'s ``sparsity.pattern`` says whether it is 2:4).
    Returns what ``swap_to_sparse24`` returns, or an empty dict when the artifact is not 2:4."""
    sparsity = metadata.get("sparsity") or {}
    if sparsity.get("pattern") != "2:4":
        return {}
    return swap_to_sparse24(model, min_tokens, names=sorted(sparsity.get("layers") or {}),
                            tune=tune)


class CapturedCall:
    """``fn`` over fixed-shape CUDA tensors, captured once in a CUDA graph and replayed.

    Replaying costs one launch whatever the number of kernels inside, which removes the
    per-call host cost of eager cuSPARSELt calls. Inputs are copied into static buffers; the
    returned tensor is the graph's static output (overwritten by the next replay).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *example: torch.Tensor,
                 warmup: int = 3) -> None:
        if not example or any(t.device.type != "cuda" for t in example):
            raise BackendUnavailable("CUDA graphs need CUDA input tensors")
        self.static_inputs = [t.clone() for t in example]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):  # lazy initialisation (cuBLAS handles, plans) happens here
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.static_inputs, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.static_output


class Sparse24Kernel(Kernel):
    """A 2:4 quantized weight, dequantized once to the activation dtype and compressed.

    Below ``DEFAULT_MIN_TOKENS`` tokens it multiplies the dequantized dense weight; at or above,
    the cuSPARSELt-compressed one. It trades the packed weight's small footprint for prefill
    speed, so ``auto`` ranks it under the packed int4 kernels and above the reference.
    """

    name: ClassVar[str] = KERNEL_NAME
    priority: ClassVar[int] = 5

    @classmethod
    def unavailable(cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
                    ) -> str | None:
        if device.type != "cuda":
            return f"2:4 semi-structured kernels need CUDA, not {device.type}"
        if dtype not in _HALF:
            return f"cuSPARSELt 2:4 needs float16 or bfloat16 activations, got {dtype}"
        if not nm_compliant(qw.dequantize(), 2, 4):
            return "the weight is not 2:4 sparse"
        if qw.out_features % _WEIGHT_MULTIPLE or qw.in_features % _WEIGHT_MULTIPLE:
            return f"weight shape {tuple(qw.q.shape)} is not a multiple of {_WEIGHT_MULTIPLE}"
        if not torch.backends.cusparselt.is_available():
            return "this torch build has no cuSPARSELt"
        return None

    @classmethod
    def pack(cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
             ) -> dict[str, torch.Tensor]:
        return {"weight": qw.dequantize(dtype).to(device).contiguous()}

    @classmethod
    def matmul(cls, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        weight: Any = module.weight
        if x.shape[0] < DEFAULT_MIN_TOKENS:
            return F.linear(x.to(weight.dtype), weight)
        packed = module.__dict__.get("_sparse24")
        if packed is None or packed.device != weight.device:
            packed = compress(weight)
            module.__dict__["_sparse24"] = packed
        return sparse_linear(x.to(weight.dtype), packed, None)
