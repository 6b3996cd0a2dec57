"""What this machine offers: CPU features, devices, and which backends can run here and why not.

Everything is probed when ``hardware_info()`` is called, never at import. Optional packages are
looked up with ``importlib.util.find_spec`` (no import, so a heavy or broken package costs nothing);
CUDA is queried through torch only inside the call.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# CPU features that decide which kernels run fast: x86 vector/matrix extensions and their Arm
# counterparts. Arm names are the kernel's /proc/cpuinfo names mapped to the usual ones.
X86_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip
ARM_FLAGS = {
    "asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16", "i8mm": "i8mm",
    "bf16": "bf16", "sve": "sve", "sve2": "sve2",
}  # fmt: skip
_X86 = ("x86_64", "amd64", "i386", "i686")
_ARM = ("aarch64", "arm64", "armv8l")

# -- CPU -------------------------------------------------------------------------------------------


def _first_cpuinfo_block() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def amx_enabled_by_os() -> bool:
    """Whether the Linux kernel supports AMX tile data for processes (XTILEDATA, state bit 18).

    A CPU may advertise AMX while the hypervisor or kernel has not enabled its register state;
    AMX kernels then die with SIGILL (seen with llama.cpp on a VM). ``arch_prctl(
    ARCH_GET_XCOMP_SUPP)`` asks the kernel without requesting anything.
    """
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    import ctypes

    sys_arch_prctl, arch_get_xcomp_supp, xfeature_xtiledata = 158, 0x1021, 18
    mask = ctypes.c_ulong(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(sys_arch_prctl, arch_get_xcomp_supp, ctypes.byref(mask)) != 0:
        return False  # kernels before 5.16 have no such request and no AMX support
    return bool(mask.value >> xfeature_xtiledata & 1)


def cpu_info() -> dict[str, Any]:
    """Model name, core counts and the kernel-relevant feature flags of this CPU."""
    import psutil

    fields = _first_cpuinfo_block()
    machine = platform.machine().lower()
    present = set((fields.get("flags") or fields.get("Features") or "").split())
    flags: dict[str, bool] = {}
    if machine in _X86:
        flags = {name: name in present for name in X86_FLAGS}
        if flags["amx_tile"]:
            flags["amx_enabled_by_os"] = amx_enabled_by_os()
    elif machine in _ARM:
        flags = {name: raw in present for raw, name in ARM_FLAGS.items()}
        if not fields:  # macOS has no /proc/cpuinfo; every Apple Silicon core has NEON
            flags = {"neon": True}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": fields.get("model name") or platform.processor() or machine,
        "architecture": machine,
        "cores": {
            "physical": psutil.cpu_count(logical=False),
            "logical": psutil.cpu_count(logical=True),
            "usable": usable,  # what this process may run on (affinity, container limits)
        },
        "flags": flags,
        "flags_source": "/proc/cpuinfo" if fields else "architecture",
    }


# -- devices ---------------------------------------------------------------------------------------


def devices(cpu_name: str | None = None) -> list[dict[str, Any]]:
    """The CPU (with total RAM), every visible CUDA device, and MPS where present."""
    import psutil
    import torch

    memory = psutil.virtual_memory()
    found: list[dict[str, Any]] = [
        {
            "type": "cpu",
            "name": cpu_name or cpu_info()["model"],
            "memory_bytes": memory.total,
            "memory_available_bytes": memory.available,
            "threads": torch.get_num_threads(),
        }
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            found.append(
                {
                    "type": "cuda",
                    "index": index,
                    "name": props.name,
                    "memory_bytes": props.total_memory,
                    "capability": f"{props.major}.{props.minor}",
                    "multiprocessors": props.multi_processor_count,
                }
            )
    if torch.backends.mps.is_available():
        found.append(
            {
                "type": "mps",
                "name": "Apple GPU (unified memory)",
                "memory_bytes": int(torch.mps.recommended_max_memory()),
            }
        )
    return found


# -- backends --------------------------------------------------------------------------------------

Check = tuple[bool, str]


@dataclass(frozen=True)
class BackendCheck:
    name: str
    check: Callable[[], Check]
    #: distribution whose version is reported, if any
    dist: str | None = None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package of a dotted name is missing
        return False


def _version(dist: str | None) -> str | None:
    if dist is None:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package(*modules: str, hint: str) -> Callable[[], Check]:
    def check() -> Check:
        missing = [m for m in modules if not _installed(m)]
        if missing:
            return False, f"not installed ({', '.join(missing)}): {hint}"
        return True, "installed"

    return check


def _extra(extra: str) -> str:
    return f"pip install 'openpto[{extra}]'"


def _cuda_reason() -> Check:
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible (driver, or CUDA_VISIBLE_DEVICES)"
    return True, f"{torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}"


def _torch_op(op: str, what: str) -> Callable[[], Check]:
    def check() -> Check:
        import torch

        if hasattr(torch.ops.aten, op):
            return True, f"{what}: torch.ops.aten.{op}"
        return False, f"torch {torch.__version__} has no torch.ops.aten.{op}"

    return check


def _mps() -> Check:
    import torch

    if torch.backends.mps.is_available():
        return True, "Apple Metal (MPS)"
    if not torch.backends.mps.is_built():
        return False, "torch was built without MPS (macOS on Apple Silicon only)"
    return False, "MPS is built in but this machine has no usable Metal device"


def _triton() -> Check:
    if not _installed("triton"):
        return False, "not installed (it comes with CUDA builds of torch)"
    cuda, why = _cuda_reason()
    return (True, "installed, CUDA present") if cuda else (False, f"installed, but {why}")


def _cusparselt() -> Check:
    import torch

    if not torch.backends.cusparselt.is_available():
        return False, f"torch {torch.__version__} was built without cuSPARSELt"
    cuda, why = _cuda_reason()
    version = torch.backends.cusparselt.version()
    return (True, f"cuSPARSELt {version}") if cuda else (False, f"cuSPARSELt present, but {why}")


BACKENDS: tuple[BackendCheck, ...] = (
    BackendCheck("torch-cpu-int4", _torch_op("_weight_int4pack_mm_for_cpu", "packed int4 matmul"),
                 "torch"),
    BackendCheck("torch-cpu-int8", _torch_op("_weight_int8pack_mm", "packed int8 matmul"), "torch"),
    BackendCheck("cuda", _cuda_reason, "torch"),
    BackendCheck("mps", _mps, "torch"),
    BackendCheck("triton", _triton, "triton"),
    BackendCheck("cusparselt-2:4", _cusparselt, "torch"),
    BackendCheck("bitsandbytes", _package("bitsandbytes", hint="pip install bitsandbytes"),
                 "bitsandbytes"),
    BackendCheck("optimum-quanto", _package("optimum.quanto", hint="pip install optimum-quanto"),
                 "optimum-quanto"),
    BackendCheck("mlx", _package("mlx", hint=_extra("mlx")), "mlx"),
    BackendCheck("mlx-lm", _package("mlx_lm", hint=_extra("mlx")), "mlx-lm"),
    BackendCheck("llama-cpp-python", _package("llama_cpp", hint=_extra("llamacpp")),
                 "llama_cpp_python"),
    BackendCheck("compressed-tensors", _package("compressed_tensors", hint=_extra("quant")),
                 "compressed-tensors"),
    BackendCheck("gguf", _package("gguf", hint="pip install gguf"), "gguf"),
    BackendCheck("datasette", _package("datasette", hint=_extra("db")), "datasette"),
    BackendCheck("fastapi+uvicorn", _package("fastapi", "uvicorn", hint=_extra("serve")),
                 "fastapi"),
    BackendCheck("textual", _package("textual", hint=_extra("tui")), "textual"),
)  # fmt: skip


def backends() -> dict[str, dict[str, Any]]:
    """Backend name -> ``{available, reason, version}``."""
    result: dict[str, dict[str, Any]] = {}
    for backend in BACKENDS:
        available, reason = backend.check()
        result[backend.name] = {
            "available": available,
            "reason": reason,
            "version": _version(backend.dist) if available else None,
        }
    return result


def hardware_info() -> dict[str, Any]:
    """Python, torch, platform, CPU, devices and backends of this machine, as plain JSON data."""
    import torch

    cpu = cpu_info()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "python_implementation": platform.python_implementation(),
        },
        "cpu": cpu,
        "devices": devices(cpu["model"]),
        "backends": backends(),
    }
