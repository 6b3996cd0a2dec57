"""What a quantization backend is: a named way of turning a loaded model into an artifact folder.

``opt quantize --backend NAME`` looks ``NAME`` up in ``openpto.registry.QUANT_BACKENDS``. The
caller builds the method config (``GPTQConfig(...)``, ``RTNConfig(...)``) and every backend
receives that object: it says which configs and bit widths it takes, whether it can run here (and
why not), how big its output will be, and does the work. The workflow around it (run record,
model load, output checks, evaluation, metrics) is the same for all of them
(``openpto.pipeline.quantize``).
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
    from openpto.core.quant import QuantConfig
    from openpto.models import LoadedModel


def describe(config: QuantConfig, device: str) -> dict[str, Any]:
    """The grid of a resolved config, for the run record and ``openpto.json``."""
    return {"method": config.type_name, "bits": config.bits, "group_size": config.group_size,
            "symmetric": config.symmetric, "device": device, "config": config.to_dict()}


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


@dataclass(frozen=True)
class QuantizeJob:
    """One quantization for a backend to do: the loaded model, the resolved config, the
    calibration batches (None when the config takes no data) and the folder to write."""

    loaded: LoadedModel
    config: QuantConfig
    calibration: torch.Tensor | None
    output: Path
    #: what goes into the artifact's ``openpto.json``
    metadata: dict[str, Any]
    on_layer: LayerHook
    device: str = "cpu"
    #: how tensors that are not quantized are stored, where the format lets the backend choose
    float_dtype: str = "bfloat16"


class QuantBackend(abc.ABC):
    name: ClassVar[str]
    #: the configs it takes (``type_name``s), where fixed; the torch backend takes any
    #: quantization config with a registered transform
    methods: ClassVar[tuple[str, ...]] = ()
    bits: ClassVar[tuple[int, ...]]
    #: the artifact format it writes (``openpto.json`` "format")
    format: ClassVar[str]
    #: whether it can keep one scale per output row (else 8 bits also get groups by default)
    per_channel: ClassVar[bool] = True

    def method_names(self) -> list[str]:
        """The method configs (``type_name``) this backend quantizes with."""
        return sorted(self.methods)

    def default_symmetric(self, bits: int) -> bool:
        """Symmetric for 8 bits (near-lossless anyway, and simpler kernels), asymmetric below."""
        return bits >= 8

    @abc.abstractmethod
    def availability(self) -> tuple[bool, str]:
        """Whether it can run on this machine, and a one-line reason (what is missing, or what
        it will use)."""

    def needs_calibration(self, config: QuantConfig) -> bool:
        return False

    def check(self, config: QuantConfig) -> None:
        """Refuse, before the model loads, a method or bit width this backend lacks, or a
        backend that cannot run here (configuration mistakes first: they hold everywhere)."""
        self.check_config(config)
        ok, reason = self.availability()
        if not ok:
            raise BackendUnavailable(f"the {self.name} backend cannot run here: {reason}")

    def check_config(self, config: Any) -> None:
        """Refuse a method or bit width this backend lacks."""
        from openpto.core.quant import QuantConfig

        name = getattr(config, "type_name", type(config).__name__)
        if not isinstance(config, QuantConfig) or name not in self.method_names():
            raise ConfigError(
                f"the {self.name} backend has no method {name!r} "
                f"(it has: {', '.join(self.method_names())})"
            )
        if config.bits not in self.bits:
            raise ConfigError(
                f"the {self.name} backend cannot quantize to {config.bits} bits "
                f"(it does: {', '.join(str(b) for b in self.bits)})"
            )

    def configure(self, config: QuantConfig) -> QuantConfig:
        """Check the resolved grid (group size, symmetry); a backend whose format fixes the grid
        returns the config with that grid (``dataclasses.replace``)."""
        return config

    def check_model(self, loaded: LoadedModel, config: QuantConfig) -> None:
        """Refuse, before any work, a model whose shapes this backend cannot handle."""
        return None

    @abc.abstractmethod
    def planned_size(self, loaded: LoadedModel, config: QuantConfig,
                     metadata: dict[str, Any], *, float_dtype: str = "bfloat16") -> int:
        """The output folder's size in bytes, computed before any work (``float_dtype`` as
        ``quantize`` takes it)."""

    @abc.abstractmethod
    def quantize(self, job: QuantizeJob) -> BackendOutput:
        """Quantize ``job.loaded`` with ``job.config`` on ``job.device`` and write the folder
        ``job.output`` atomically, with ``job.metadata`` in its ``openpto.json``."""
