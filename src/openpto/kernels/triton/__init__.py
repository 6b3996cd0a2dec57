"""Triton GPU kernels: W4A16 and compressed 2:4 matrix products for decode-sized inputs.

Importing this package imports no triton: ``linear`` (the ``Kernel`` classes registered in
``openpto.registry.KERNELS``) and ``tuned`` (measured launch shapes) load anywhere; ``w4a16``,
``sparse24`` and ``common`` import triton and are loaded only when a kernel runs.
"""
