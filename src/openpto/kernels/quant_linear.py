"""``QuantLinear``: a Linear whose weight stays packed and whose matmul runs on a real kernel."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from openpto.core.quant.tensor import QuantizedWeight
from openpto.errors import BackendUnavailable, ConfigError
from openpto.kernels.base import Kernel, select_kernel


class QuantLinear(nn.Module):
    """Packed weight + kernel. The packed layout is specific to the device it was built for:
    build it where it will run (``swap_to_packed`` on the target device) rather than moving it."""

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        kernel: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.in_features = qw.in_features
        self.out_features = qw.out_features
        self.bits = qw.bits
        self.group_size = qw.group_size
        self.symmetric = qw.symmetric
        self.dtype = dtype
        self.kernel: type[Kernel] = select_kernel(qw, device, dtype, kernel)
        self.built_for = device.type
        for name, tensor in self.kernel.pack(qw, device, dtype).items():
            self.register_buffer(name, tensor.to(device))
        self.bias: torch.Tensor | None
        if bias is not None:
            self.register_buffer("bias", bias.detach().to(device=device, dtype=dtype).clone())
        else:
            self.bias = None

    @property
    def kernel_name(self) -> str:
        return self.kernel.name

    def packed_nbytes(self) -> int:
        """Bytes resident for this layer: every buffer, bias included."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.built_for and self.kernel.name != "dequantized-reference":
            raise BackendUnavailable(
                f"{self.kernel.name} weights were packed for {self.built_for}, got input on "
                f"{x.device.type}; swap_to_packed on the device that will run the model"
            )
        shape = x.shape
        y = self.kernel.matmul(self, x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, kernel={self.kernel.name}"
        )


def swap_to_packed(
    model: nn.Module,
    quantized: dict[str, QuantizedWeight],
    kernel: str = "auto",
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, int]:
    """Replace each named ``nn.Linear`` with a ``QuantLinear`` on the Linear's own device.

    ``dtype`` is the activation dtype the kernels compute in (default: each Linear's weight
    dtype). Returns ``model_kernel_summary(model)``.
    """
    for name, qw in quantized.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError as exc:
            raise ConfigError(f"the model has no module {name!r} to replace") from exc
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        if (linear.out_features, linear.in_features) != tuple(qw.q.shape):
            raise ConfigError(
                f"{name} has shape {(linear.out_features, linear.in_features)} but its quantized "
                f"weight has {tuple(qw.q.shape)}"
            )
        packed = QuantLinear(
            qw,
            linear.bias,
            kernel=kernel,
            dtype=dtype or linear.weight.dtype,
            device=linear.weight.device,
        )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, packed)
    return model_kernel_summary(model)


def model_kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many Linears run on each kernel; plain ``nn.Linear`` counts as ``"dense"``."""
    counts: Counter[str] = Counter()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            counts[module.kernel_name] += 1
        elif isinstance(module, nn.Linear):
            counts["dense"] += 1
    return dict(sorted(counts.items()))
