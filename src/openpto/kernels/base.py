"""The kernel interface of packed Linears, and kernel selection through ``KERNELS``.

A kernel is a stateless class: ``unavailable`` says why it cannot run a given weight on a given
device (or ``None`` if it can), ``pack`` turns a ``QuantizedWeight`` into the buffers it reads,
and ``matmul`` computes ``x @ W^T`` from them. ``"auto"`` picks the available kernel with the
highest ``priority``, so faster kernels registered later (Triton, Marlin-style) win without any
change here or in the algorithms.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

import torch

from openpto.errors import BackendUnavailable, MissingDependency, PluginError
from openpto.registry import KERNELS

if TYPE_CHECKING:
    from openpto.core.quant.tensor import QuantizedWeight
    from openpto.kernels.quant_linear import QuantLinear


class Kernel(abc.ABC):
    #: the label every measurement carries, e.g. "packed-int4-cpu"
    name: ClassVar[str]
    #: "auto" prefers higher; the dequantize-then-matmul reference is 0
    priority: ClassVar[int] = 0

    @classmethod
    @abc.abstractmethod
    def unavailable(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> str | None:
        """``None`` when this kernel can run ``qw`` on ``device`` for activations of ``dtype``,
        otherwise the reason it cannot."""

    @classmethod
    @abc.abstractmethod
    def pack(
        cls, qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The buffers ``matmul`` reads; ``QuantLinear`` registers them, so they move and count."""

    @classmethod
    @abc.abstractmethod
    def matmul(cls, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """``x [M, in] @ W^T -> [M, out]`` in ``x``'s dtype, reading ``module``'s buffers."""


def kernel_class(name: str) -> type[Kernel]:
    return KERNELS.get(name)  # type: ignore[no-any-return]


def kernel_reasons(
    qw: QuantizedWeight, device: torch.device, dtype: torch.dtype
) -> dict[str, str | None]:
    """Every registered kernel with ``None`` (usable) or the reason it is not."""
    reasons: dict[str, str | None] = {}
    for name in KERNELS.names():
        try:
            cls = kernel_class(name)
        except (ImportError, MissingDependency, PluginError) as exc:
            reasons[name] = f"cannot import: {exc}"
            continue
        reasons[name] = cls.unavailable(qw, device, dtype)
    return reasons


def select_kernel(
    qw: QuantizedWeight, device: torch.device, dtype: torch.dtype, kernel: str = "auto"
) -> type[Kernel]:
    if kernel != "auto":
        cls = kernel_class(kernel)
        reason = cls.unavailable(qw, device, dtype)
        if reason is not None:
            raise BackendUnavailable(f"kernel {kernel!r} cannot run this weight: {reason}")
        return cls
    usable = [
        kernel_class(n) for n, why in kernel_reasons(qw, device, dtype).items() if why is None
    ]
    if not usable:
        raise BackendUnavailable(
            f"no kernel can run a {qw.bits}-bit weight on {device} (not even the reference)"
        )
    return max(usable, key=lambda c: (c.priority, c.name))
