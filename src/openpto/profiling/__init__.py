"""Latency, throughput and memory of generation, measured so that the numbers can be trusted.

    from openpto.profiling import profile_generation
    result = profile_generation(model, prompt_len=128, gen_len=128, repeats=5)
    result.to_dict()["decode_tokens_per_second"]

Every result states how it was measured: device, dtype, the kernels the Linears ran on, warm-up
runs, repeats, and that timings were taken after the device had delivered each token.
"""

from openpto.profiling.measure import (
    ProfileResult,
    kernel_summary,
    memory_probe,
    profile_generation,
)
from openpto.profiling.modules import module_times

__all__ = ["ProfileResult", "kernel_summary", "memory_probe", "module_times", "profile_generation"]
