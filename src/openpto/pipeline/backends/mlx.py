"""The ``mlx`` backend: MLX's own affine quantization through ``mlx_lm.convert``, written as an
MLX folder that ``mlx_lm.load`` and ``mlx_lm.generate`` read (Apple silicon, or Linux CPU with
``mlx[cpu]``).

MLX quantizes every Linear and the embedding whose width the group size divides, with a float
scale and bias per group (``w = q s + b``: always asymmetric, never per-channel).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from openpto.errors import ConfigError, MissingDependency
from openpto.pipeline.artifacts import (
    check_output,
    folder_size,
    small_files_size,
    staged_folder,
)
from openpto.pipeline.backends.base import BackendOutput, QuantBackend, QuantizeJob

if TYPE_CHECKING:
    from openpto.core.quant import QuantConfig
    from openpto.models import LoadedModel

FORMAT_MLX = "mlx"
GROUP_SIZES = (32, 64, 128)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class MLXBackend(QuantBackend):
    name: ClassVar[str] = "mlx"
    methods: ClassVar[tuple[str, ...]] = ("rtn",)
    bits: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 8)
    format: ClassVar[str] = FORMAT_MLX
    per_channel: ClassVar[bool] = False

    def availability(self) -> tuple[bool, str]:
        mlx, mlx_lm = _version("mlx"), _version("mlx-lm")
        if mlx is None or mlx_lm is None:
            return False, "mlx and mlx-lm are not installed: pip install 'openpto[mlx]'"
        try:
            import mlx.core as mx
        except ImportError as exc:  # installed but not loadable (no wheel for this platform)
            return False, f"mlx {mlx} is installed but cannot load: {exc}"
        return True, f"mlx {mlx}, mlx-lm {mlx_lm} on {mx.default_device()}"

    def default_symmetric(self, bits: int) -> bool:
        return False

    def configure(self, config: QuantConfig) -> QuantConfig:
        if config.symmetric:
            raise ConfigError("the mlx backend quantizes with a scale and a bias per group "
                              "(asymmetric); drop --sym")
        if config.group_size not in GROUP_SIZES:
            raise ConfigError(f"the mlx backend needs a group size of 32, 64 or 128, not "
                              f"{config.group_size or 'per-channel'}")
        return config

    def planned_size(self, loaded: LoadedModel, config: QuantConfig,
                     metadata: dict[str, Any], *, float_dtype: str = "bfloat16") -> int:
        group = int(config.group_size or 64)
        total = 0
        tensors = 0
        seen: set[int] = set()
        for module in loaded.model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                quantizable = isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
                if quantizable and pname == "weight" and p.shape[-1] % group == 0:
                    rows, cols = p.shape
                    total += rows * cols * config.bits // 8
                    total += 2 * rows * (cols // group) * p.element_size()
                    tensors += 2
                else:
                    total += p.numel() * p.element_size()
                tensors += 1
        # Per tensor: about 120 bytes of safetensors header and 80 of mlx-lm's index file.
        total += 200 * tensors
        return total + small_files_size(loaded.model, loaded.tokenizer, None, metadata)

    def quantize(self, job: QuantizeJob) -> BackendOutput:
        if _version("mlx-lm") is None:
            raise MissingDependency("mlx-lm", "mlx", "the mlx backend")
        from mlx_lm.convert import convert

        from openpto.models import save_model

        check_output(job.output)
        with (staged_folder(job.output, job.metadata, FORMAT_MLX) as tmp,
              tempfile.TemporaryDirectory(prefix="openpto-mlx-") as scratch):
            float_folder = Path(scratch) / "float"
            save_model(job.loaded.model, job.loaded.tokenizer, float_folder)
            started = time.perf_counter()
            # mlx_lm prints progress on stdout, which belongs to --json output.
            with contextlib.redirect_stdout(sys.stderr):
                convert(str(float_folder), str(tmp), quantize=True,
                        q_group_size=int(job.config.group_size or 64),
                        q_bits=job.config.bits)
            seconds = time.perf_counter() - started
        return BackendOutput(format=FORMAT_MLX, seconds=seconds, model=None,
                             score=lambda ids, seq_len: mlx_perplexity(job.output, ids, seq_len),
                             details={"size_bytes": folder_size(job.output)})


def mlx_perplexity(folder: Path, ids: torch.Tensor, seq_len: int) -> float:
    """Perplexity of an MLX folder on ``ids`` in non-overlapping windows (the same protocol as
    ``openpto.core.metrics.perplexity``: every token after a window's first is scored)."""
    import math

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    model = load(str(folder))[0]
    windows = ids[: (len(ids) // seq_len) * seq_len].reshape(-1, seq_len)
    total, count = 0.0, 0
    for window in windows:
        x = mx.array(window.numpy()[None])
        logits = model(x[:, :-1]).astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, x[:, 1:], reduction="sum")
        total += float(loss.item())  # type: ignore[arg-type]
        count += seq_len - 1
    return math.exp(total / count)
