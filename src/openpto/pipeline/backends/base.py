"""What a quantization backend is: a named way of turning a loaded model into an artifact folder.

``opt quantize --backend NAME`` looks ``NAME`` up in ``openpto.registry.QUANT_BACKENDS``; each
backend says which methods and bit widths it has, whether it can run here (and why not), how big
its output will be, and does the work. The workflow around it (run record, model load, output
checks, evaluation, metrics) is the same for all of them (``openpto.pipeline.quantize``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from openpto.errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    import torch

    from openpto.core.calibrate import LayerEvent
    from openpto.models import LoadedModel


@dataclass(frozen=True)
class QuantRequest:
    """A resolved ``opt quantize`` request (the group size already checked against the model)."""

    method: str
    bits: int
    group_size: int | None  # None: one group per output row (per-channel)
    symmetric: bool
    device: str
    config: Any = None  # the method config (torch backend), with ``to_dict()``
    # GPTQ fitted to the float model's outputs (``GPTQConfig.float_targets``); None: its default
    float_targets: bool | None = None

    def describe(self) -> dict[str, Any]:
        data = {"method": self.method, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "device": self.device}
        if self.float_targets is not None:
            data["float_targets"] = self.float_targets
        if self.config is not None:
            data["config"] = self.config.to_dict()
        return data


@dataclass
class BackendOutput:
    """What a backend hands back: the artifact folder and how the quantization went."""

    format: str
    seconds: float  # quantization (and calibration) time, not loading or saving
    # A torch model computing with exactly the artifact's weights, for ``--eval`` (None when the
    # backend's model is not a torch module; then ``score`` is used).
    model: Any = None
    score: Callable[[torch.Tensor, int], float] | None = None  # (ids, seq_len) -> perplexity
    layer_errors: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


LayerHook = Callable[["LayerEvent"], None]


class QuantBackend(abc.ABC):
    name: ClassVar[str]
    methods: ClassVar[tuple[str, ...]]
    bits: ClassVar[tuple[int, ...]]
    #: the artifact format it writes (``openpto.json`` "format")
    format: ClassVar[str]
    #: whether it can keep one scale per output row (else 8 bits also get groups by default)
    per_channel: ClassVar[bool] = True
    #: whether GPTQ here can be fitted to the float model's outputs (``--float-targets``)
    float_targets: ClassVar[bool] = False

    def default_symmetric(self, bits: int) -> bool:
        """Symmetric for 8 bits (near-lossless anyway, and simpler kernels), asymmetric below."""
        return bits >= 8

    @abc.abstractmethod
    def availability(self) -> tuple[bool, str]:
        """Whether it can run on this machine, and a one-line reason (what is missing, or what
        it will use)."""

    def needs_calibration(self, request: QuantRequest) -> bool:
        return False

    def check(self, request: QuantRequest) -> None:
        """Refuse, before the model loads, a method or bit width this backend lacks, or a
        backend that cannot run here (configuration mistakes first: they hold everywhere)."""
        self.check_config(request)
        ok, reason = self.availability()
        if not ok:
            raise BackendUnavailable(f"the {self.name} backend cannot run here: {reason}")

    def check_config(self, request: QuantRequest) -> None:
        """Refuse a method or bit width this backend lacks."""
        if request.method not in self.methods:
            raise ConfigError(
                f"the {self.name} backend has no method {request.method!r} "
                f"(it has: {', '.join(self.methods)})"
            )
        if request.bits not in self.bits:
            raise ConfigError(
                f"the {self.name} backend cannot quantize to {request.bits} bits "
                f"(it does: {', '.join(str(b) for b in self.bits)})"
            )
        if request.float_targets is not None and not (
            self.float_targets and request.method == "gptq"
        ):
            raise ConfigError(
                "--float-targets/--no-float-targets apply to GPTQ on the torch backend only"
            )

    def configure(self, request: QuantRequest) -> QuantRequest:
        """Check the resolved grid (group size, symmetry) and attach what the backend needs."""
        return request

    def check_model(self, loaded: LoadedModel, request: QuantRequest) -> None:
        """Refuse, before any work, a model whose shapes this backend cannot handle."""
        return None

    @abc.abstractmethod
    def planned_size(self, loaded: LoadedModel, request: QuantRequest,
                     metadata: dict[str, Any]) -> int:
        """The output folder's size in bytes, computed before any work."""

    @abc.abstractmethod
    def quantize(
        self,
        loaded: LoadedModel,
        request: QuantRequest,
        calibration: torch.Tensor | None,
        output: Path,
        metadata: dict[str, Any],
        on_layer: LayerHook,
    ) -> BackendOutput:
        """Quantize ``loaded`` and write the folder ``output`` atomically, with ``metadata`` in
        its ``openpto.json``."""
