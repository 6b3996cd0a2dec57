"""Packed Linear modules and the kernels that run them.

Kernels are looked up by name in ``openpto.registry.KERNELS``, each a
``openpto.kernels.base.Kernel``, registered through the ``register_kernels`` plugin hook (the
built-ins in ``openpto.default_plugins.kernels``). ``QuantLinear(..., kernel="auto")`` takes the
available one with the highest priority, so a new kernel needs no change here.
"""

from __future__ import annotations

from openpto.kernels.quant_linear import QuantLinear, model_kernel_summary, swap_to_packed

__all__ = ["QuantLinear", "model_kernel_summary", "swap_to_packed"]
