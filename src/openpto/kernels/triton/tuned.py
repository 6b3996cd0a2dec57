"""Launch shapes measured on an H200 by ``benchmarks/gpu_w4a16.py --tune`` and
``benchmarks/gpu_sparse24.py --tune``; shapes not listed use ``gpu_dispatch``'s rules."""

from __future__ import annotations

from openpto.kernels.gpu_dispatch import Launch

#: (out_features, in_features, token bucket) -> launch
W4A16: dict[tuple[int, int, int], Launch] = {}

#: (values "bf16" | "int4", out_features, in_features, token bucket) -> launch
SPARSE24: dict[tuple[str, int, int, int], Launch] = {}
