"""The ``quanto`` backend: optimum-quanto's data-free qint8 (per row) and qint4 (groups of 128,
asymmetric) weights, saved with quanto's own serialisation next to the tokenizer.

quanto JIT-compiles a small C++ extension the first time a quantized weight is unpacked on CPU
(about a minute); later runs reuse the build.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from openpto.errors import ConfigError, installed_library
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

FORMAT_QUANTO = "quanto"
#: bits -> (quanto weight type name, its group size: None means one scale per row)
GRIDS = {4: ("qint4", 128), 8: ("qint8", None)}


class QuantoBackend(QuantBackend):
    name: ClassVar[str] = "quanto"
    methods: ClassVar[tuple[str, ...]] = ("rtn",)
    bits: ClassVar[tuple[int, ...]] = tuple(GRIDS)
    format: ClassVar[str] = FORMAT_QUANTO

    def availability(self) -> tuple[bool, str]:
        version, missing = installed_library("optimum-quanto", "optimum.quanto", "backends")
        if version is None:
            return False, missing
        return True, f"optimum-quanto {version}: qint8 per row, qint4 groups of 128"

    def configure(self, config: QuantConfig) -> QuantConfig:
        kind, group = GRIDS[config.bits]
        if config.symmetric != (config.bits == 8):
            sym = "symmetric" if config.bits == 8 else "asymmetric"
            raise ConfigError(f"quanto's {kind} is {sym}; drop --sym/--asym")
        # quanto fixes its own grid; the config records what it really is.
        return dataclasses.replace(config, group_size=group)

    def planned_size(self, loaded: LoadedModel, config: QuantConfig,
                     metadata: dict[str, Any], *, float_dtype: str = "bfloat16") -> int:
        from openpto.pipeline.backends.torch_backend import parameter_bytes

        def stored(w: torch.Tensor) -> int:
            rows, cols = w.shape
            if config.bits == 4:  # nibbles + a scale and a shift per 128 weights
                return rows * cols // 2 + 2 * (rows * cols // 128) * w.element_size()
            return rows * cols + rows * w.element_size()  # int8 codes + a scale per row

        total = parameter_bytes(loaded.model, stored)
        return total + small_files_size(loaded.model, loaded.tokenizer, None, metadata)

    def quantize(self, job: QuantizeJob) -> BackendOutput:
        import optimum.quanto as quanto

        check_output(job.output)
        weights = getattr(quanto, GRIDS[job.config.bits][0])
        started = time.perf_counter()
        qmodel = quanto.QuantizedModelForCausalLM.quantize(
            job.loaded.model, weights=weights, exclude="lm_head"
        )
        seconds = time.perf_counter() - started
        with staged_folder(job.output, job.metadata, FORMAT_QUANTO) as tmp:
            qmodel.save_pretrained(str(tmp))
            job.loaded.tokenizer.save_pretrained(tmp)
        return BackendOutput(format=FORMAT_QUANTO, seconds=seconds, model=qmodel._wrapped,
                             details={"size_bytes": folder_size(job.output)})
