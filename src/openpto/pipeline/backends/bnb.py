"""The ``bitsandbytes`` backend: NF4 (4-bit, blocks of 64) or LLM.int8 (8-bit, per row), data-free.

The model is saved as a plain folder and reloaded by transformers with a ``BitsAndBytesConfig``,
which swaps in bitsandbytes' ``Linear4bit``/``Linear8bitLt``; the result is saved with its
``quantization_config`` so transformers reloads it quantized. bitsandbytes 0.45+ runs these on
CPU through torch fallbacks (slow, but real); on CUDA it uses its own kernels.
"""

from __future__ import annotations

import dataclasses
import tempfile
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

FORMAT_BNB = "bitsandbytes"
#: method -> (bits, block size: NF4's absmax blocks, None for LLM.int8's per-row scales)
METHODS = {"nf4": (4, 64), "int8": (8, None)}


class BitsAndBytesBackend(QuantBackend):
    name: ClassVar[str] = "bitsandbytes"
    methods: ClassVar[tuple[str, ...]] = tuple(METHODS)
    bits: ClassVar[tuple[int, ...]] = (4, 8)
    format: ClassVar[str] = FORMAT_BNB

    def availability(self) -> tuple[bool, str]:
        version, missing = installed_library("bitsandbytes", "bitsandbytes", "backends",
                                             (ImportError, RuntimeError))
        if version is None:
            return False, missing
        where = "CUDA kernels" if torch.cuda.is_available() else "CPU (torch fallbacks, slow)"
        return True, f"bitsandbytes {version}: NF4 and LLM.int8 on {where}"

    def default_symmetric(self, bits: int) -> bool:
        return True  # both formats scale by the absolute maximum

    def check_config(self, config: Any) -> None:
        super().check_config(config)
        bits, _ = METHODS[config.type_name]
        if config.bits != bits:
            raise ConfigError(f"bitsandbytes {config.type_name} is {bits}-bit; pass --bits {bits}")

    def configure(self, config: QuantConfig) -> QuantConfig:
        if not config.symmetric:
            raise ConfigError("bitsandbytes formats are symmetric (absmax); drop --asym")
        # The grid is the format's own: NF4 blocks of 64, LLM.int8 one scale per row.
        return dataclasses.replace(config, group_size=METHODS[config.type_name][1])

    def check_model(self, loaded: LoadedModel, config: QuantConfig) -> None:
        from openpto.pipeline.backends.torch_backend import decoder_linears

        if config.type_name != "nf4" or torch.cuda.is_available():
            return
        widths = sorted({m.in_features for m in decoder_linears(loaded.model).values()
                         if m.in_features % 64})
        if widths:
            # bitsandbytes' CPU NF4 matmul reshapes the absmax per row: whole blocks per row only.
            raise ConfigError(f"bitsandbytes NF4 on CPU needs input widths divisible by 64; "
                              f"this model has {', '.join(map(str, widths))}")

    def _config(self, config: QuantConfig) -> Any:
        from transformers import BitsAndBytesConfig

        if config.type_name == "nf4":
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
        return BitsAndBytesConfig(load_in_8bit=True)

    def planned_size(self, loaded: LoadedModel, config: QuantConfig,
                     metadata: dict[str, Any], *, float_dtype: str = "bfloat16") -> int:
        from openpto.pipeline.backends.torch_backend import parameter_bytes

        def stored(w: torch.Tensor) -> int:
            rows, cols = w.shape
            if config.type_name == "nf4":  # packed nibbles + a float32 absmax per 64
                return rows * cols // 2 + rows * cols // 64 * 4
            return rows * cols + rows * 4  # int8 codes + a float32 scale per row

        total = parameter_bytes(loaded.model, stored)
        return total + small_files_size(loaded.model, loaded.tokenizer, None, metadata)

    def quantize(self, job: QuantizeJob) -> BackendOutput:
        from transformers import AutoModelForCausalLM

        from openpto.models import save_model

        check_output(job.output)
        with staged_folder(job.output, job.metadata, FORMAT_BNB) as tmp:
            with tempfile.TemporaryDirectory(prefix="openpto-bnb-") as scratch:
                save_model(job.loaded.model, job.loaded.tokenizer, scratch)
                started = time.perf_counter()
                model = AutoModelForCausalLM.from_pretrained(  # nosec B615  # local folder
                    scratch, quantization_config=self._config(job.config), device_map="cpu"
                    if job.device == "cpu" else job.device, dtype=job.loaded.dtype,
                )
                seconds = time.perf_counter() - started
            model.eval()
            # lm_head stays float: transformers keeps the output projection out of bitsandbytes.
            model.save_pretrained(tmp)
            job.loaded.tokenizer.save_pretrained(tmp)
        return BackendOutput(format=FORMAT_BNB, seconds=seconds, model=model,
                             details={"size_bytes": folder_size(job.output)})
