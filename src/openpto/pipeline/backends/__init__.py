"""Quantization backends, looked up by name in ``openpto.registry.QUANT_BACKENDS``.

``torch`` is ours (RTN/GPTQ/AWQ, packed compressed-tensors artifacts); ``bitsandbytes``,
``quanto`` and ``mlx`` wrap those libraries as data-free alternatives. Each entry is imported
only when used, and each reports whether it can run here (``backend_availability``). They are
registered through the ``register_quantization_backends`` plugin hook (the built-ins in
``openpto.default_plugins.backends``).
"""

from __future__ import annotations

from typing import Any

from openpto.errors import PluginError
from openpto.registry import QUANT_BACKENDS


def get_backend(name: str) -> Any:
    """An instance of the backend registered as ``name`` (``UsageError`` naming the known ones)."""
    return QUANT_BACKENDS.get(name)()


def backend_availability() -> dict[str, dict[str, Any]]:
    """Every quantization backend -> ``{available, reason}`` (for ``opt info``)."""
    report: dict[str, dict[str, Any]] = {}
    for name in QUANT_BACKENDS.names():
        try:
            ok, reason = get_backend(name).availability()
        except PluginError as exc:  # an installed plugin's backend that cannot be imported
            ok, reason = False, str(exc)
        report[name] = {"available": ok, "reason": reason}
    return report
