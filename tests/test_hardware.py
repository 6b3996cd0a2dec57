"""hardware_info: CPU flags against /proc/cpuinfo, devices, and the backend table with reasons."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from openpto import hardware


def test_top_level_keys_and_versions() -> None:
    info = hardware.hardware_info()
    assert {"python", "torch", "platform", "cpu", "devices", "backends"} <= info.keys()
    assert info["python"] == platform.python_version()
    assert info["torch"] == torch.__version__
    assert info["platform"]["machine"] == platform.machine()
    json.dumps(info)  # plain JSON data all the way down


def test_cpu_device_reports_total_ram() -> None:
    cpu = hardware.devices()[0]
    assert cpu["type"] == "cpu"
    assert cpu["memory_bytes"] == psutil.virtual_memory().total > 0
    assert cpu["threads"] == torch.get_num_threads()


def test_cuda_devices_only_when_cuda_is_there() -> None:
    found = hardware.devices()
    cuda = [d for d in found if d["type"] == "cuda"]
    if not torch.cuda.is_available():
        assert cuda == []
        return
    assert len(cuda) == torch.cuda.device_count()
    major, minor = torch.cuda.get_device_capability(0)
    assert cuda[0]["capability"] == f"{major}.{minor}"
    assert cuda[0]["memory_bytes"] == torch.cuda.get_device_properties(0).total_memory


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo")
def test_cpu_flags_match_proc_cpuinfo() -> None:
    text = Path("/proc/cpuinfo").read_text()
    line = next(
        (ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "flags :"
    )
    present = set(line.split(":", 1)[1].split())
    cpu = hardware.cpu_info()
    assert cpu["flags_source"] == "/proc/cpuinfo"
    assert cpu["cores"]["logical"] >= cpu["cores"]["usable"] >= 1
    assert cpu["cores"]["logical"] >= (cpu["cores"]["physical"] or 1)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert {k: v for k, v in cpu["flags"].items() if k in hardware.X86_FLAGS} == {
            name: name in present for name in hardware.X86_FLAGS
        }
        # The kernel only enables AMX state on CPUs that have AMX (a VM may do the reverse).
        if hardware.amx_enabled_by_os():
            assert "amx_tile" in present


def test_arm_features_are_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_first_cpuinfo_block",
                        lambda: {"Features": "fp asimd evtstrm asimddp i8mm bf16"})
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    flags = hardware.cpu_info()["flags"]
    assert flags == {"neon": True, "dotprod": True, "fp16": False, "i8mm": True, "bf16": True,
                     "sve": False, "sve2": False}
    monkeypatch.setattr(hardware, "_first_cpuinfo_block", dict)  # macOS: no /proc/cpuinfo
    assert hardware.cpu_info()["flags"] == {"neon": True}


def test_amx_check_is_false_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware.sys, "platform", "darwin")
    assert hardware.amx_enabled_by_os() is False


def test_every_backend_has_a_status_and_reason() -> None:
    found = hardware.backends()
    assert list(found) == [b.name for b in hardware.BACKENDS]
    for name, status in found.items():
        assert isinstance(status["available"], bool), name
        assert status["reason"], name
    assert found["torch-cpu-int4"]["available"] == hasattr(
        torch.ops.aten, "_weight_int4pack_mm_for_cpu"
    )
    assert found["torch-cpu-int8"]["available"] == hasattr(torch.ops.aten, "_weight_int8pack_mm")
    assert found["cuda"]["available"] == torch.cuda.is_available()
    assert found["mps"]["available"] == torch.backends.mps.is_available()
    expected_2_4 = torch.backends.cusparselt.is_available() and torch.cuda.is_available()
    assert found["cusparselt-2:4"]["available"] == expected_2_4
    assert found["gguf"]["available"] and found["gguf"]["version"]  # a core dependency


def test_missing_packages_name_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = hardware.importlib.util.find_spec

    def find_spec(name: str):  # type: ignore[no-untyped-def]
        if name == "textual":
            return None
        if name == "optimum.quanto":
            raise ModuleNotFoundError("No module named 'optimum'")
        if name == "uvicorn":
            return None
        return real_find_spec(name)

    monkeypatch.setattr(hardware.importlib.util, "find_spec", find_spec)
    found = hardware.backends()
    assert found["textual"] == {
        "available": False,
        "reason": "not installed (textual): pip install 'openpto[tui]'",
        "version": None,
    }
    assert found["optimum-quanto"]["reason"].endswith("pip install optimum-quanto")
    both = found["fastapi+uvicorn"]
    assert not both["available"]
    assert "uvicorn" in both["reason"] and "openpto[serve]" in both["reason"]


def test_import_is_cheap() -> None:
    code = "import sys, openpto.hardware; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "False"
