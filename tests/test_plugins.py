"""Plugins: third-party distributions installed with pip (no index) add a quantization method
that ``opt quantize --method`` runs; a broken plugin is reported once and skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from openpto.hookspecs import hookimpl
from openpto.plugins import PluginLoadWarning, plugin_report
from openpto.registry import KERNELS, QUANT_BACKENDS
from tests.helpers import registered_plugin

# A method that exists nowhere in openpto: symmetric round-to-nearest whose per-group scale is
# rounded up to a power of two (so dequantizing is a shift). Every stored scale is then exactly
# 2**k and no weight is clipped, which the test checks on the artifact.
POW2_MODULE = '''
"""Power-of-two scales: symmetric round-to-nearest on a grid whose step is a power of two."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from openpto.core.quant.configs import QuantConfig
from openpto.errors import ConfigError
from openpto.hookspecs import hookimpl


@dataclass(frozen=True)
class Pow2Config(QuantConfig):
    type_name: ClassVar[str] = "pow2"
    symmetric: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.symmetric:
            raise ConfigError("pow2 is symmetric only: pass --sym")


@torch.no_grad()
def pow2_transform(model, config, calibration=None, *, device=None, on_layer=None):
    from openpto.core.calibrate import (
        CompressionResult, LinearReport, decoder_layers, find_linears,
    )
    from openpto.core.quant.tensor import QuantizedWeight

    started = time.perf_counter()
    prefix, layers = decoder_layers(model)
    half = 2 ** (config.bits - 1)
    reports = []
    for index, layer in enumerate(layers):
        for name, linear in find_linears(layer).items():
            w = linear.weight.data.float()
            rows, width = w.shape
            group = config.group_size or width
            grouped = w.reshape(rows, width // group, group)
            peak = grouped.abs().amax(-1).clamp_min(1e-12)
            scale = torch.exp2(torch.ceil(torch.log2(peak / (half - 1))))
            codes = torch.round(grouped / scale[..., None]) + half
            q = codes.clamp(0, 2 * half - 1).reshape(rows, width).to(torch.uint8)
            qw = QuantizedWeight(q, scale, torch.full_like(scale, float(half)), config.bits,
                                 group, True)
            w_hat = qw.dequantize()
            error = float((w - w_hat).pow(2).sum() / w.pow(2).sum())
            linear.weight.data = w_hat.to(linear.weight.dtype)
            reports.append(LinearReport(index, f"{prefix}.{index}.{name}", error, 0.0,
                                        quantized=qw))
    return CompressionResult(config.type_name, config.to_dict(), reports,
                             time.perf_counter() - started, "cpu")


@hookimpl
def register_methods(register):
    register(Pow2Config, pow2_transform)
'''

BROKEN_IMPORT_MODULE = '''
import openpto_no_such_dependency  # noqa: F401
'''

BROKEN_HOOK_MODULE = '''
from openpto.hookspecs import hookimpl


@hookimpl
def register_kernels(register):
    register("half-made-kernel", "openpto_broken_hook:Nothing")
    raise RuntimeError("this hook always fails")
'''


def _distribution(root: Path, name: str, modules: dict[str, str],
                  entry_points: dict[str, str]) -> Path:
    """A source tree of one distribution: pyproject.toml declaring the entry points, and the
    top-level modules."""
    root.mkdir()
    points = "\n".join(f'{key} = "{value}"' for key, value in entry_points.items())
    (root / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "0.1"

        [tool.setuptools]
        py-modules = {json.dumps(sorted(modules))}

        [project.entry-points."openpto.plugins"]
        """) + points + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)
    return root


def _pip_install(source: Path, target: Path) -> Path:
    """``pip install`` into a folder of its own, without an index or build isolation."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
         str(source)],
        check=True, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    return target


def _opt(args: list[str], site: Path, db: Path) -> subprocess.CompletedProcess[str]:
    """``python -m openpto ARGS`` in a fresh process that sees the plugin folder ``site``."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OPT_DB": str(db), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "openpto", *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def plugin_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plugins")
    good = _distribution(root / "pow2-src", "openpto-pow2", {"openpto_pow2": POW2_MODULE},
                         {"pow2": "openpto_pow2"})
    broken = _distribution(
        root / "broken-src", "openpto-broken",
        {"openpto_broken_import": BROKEN_IMPORT_MODULE, "openpto_broken_hook": BROKEN_HOOK_MODULE},
        {"broken-import": "openpto_broken_import", "broken-hook": "openpto_broken_hook"},
    )
    return {"good": _pip_install(good, root / "good-site"),
            "broken": _pip_install(broken, root / "broken-site")}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from openpto.models import save_model
    from tests.helpers import tiny_llama, tiny_tokenizer

    return save_model(tiny_llama(seed=5), tiny_tokenizer(), tmp_path_factory.mktemp("tiny"))


def _configs_of_type(data: Any, type_name: str) -> list[dict[str, Any]]:
    """Every config dict inside ``data`` whose ``type`` is ``type_name``."""
    if isinstance(data, dict):
        found = [data] if data.get("type") == type_name else []
        return found + [c for v in data.values() for c in _configs_of_type(v, type_name)]
    if isinstance(data, list):
        return [c for v in data for c in _configs_of_type(v, type_name)]
    return []


def test_installed_plugin_adds_a_quantization_method(
    plugin_sites: dict[str, Path], tiny_folder: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from openpto.models.artifact_loaders import read_packed_weights
    from openpto.store import Store

    db, out = tmp_path / "opt.db", tmp_path / "pow2-artifact"
    done = _opt(["quantize", str(tiny_folder), "--method", "pow2", "--bits", "4",
                 "--group-size", "32", "--sym", "--samples", "2", "--calib-seq-len", "16",
                 "--output", str(out), "--json"], plugin_sites["good"], db)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["method"], result["bits"], result["group_size"]) == ("pow2", 4, 32)
    assert "PluginLoadWarning" not in done.stderr

    float_weights = load_file(tiny_folder / "model.safetensors")
    packed = read_packed_weights(out, None)
    assert len(packed) == 2 * 7  # every Linear of both decoder layers
    for name, qw in packed.items():
        assert (qw.bits, qw.group_size, qw.symmetric) == (4, 32, True)
        # The grid's step is a power of two exactly (RTN's max/7 step almost never is) ...
        assert torch.equal(qw.scale, torch.exp2(torch.round(torch.log2(qw.scale)))), name
        # ... sized so that nothing clips: every weight within half a step of its grid point.
        w = float_weights[f"{name}.weight"].float()
        step = qw.scale.repeat_interleave(32, dim=1)
        assert ((w - qw.dequantize()).abs() <= step / 2 * (1 + 1e-6)).all(), name
        assert int(qw.q.max()) <= 15

    [run] = Store(db).query_readonly("select kind, status, config from runs where id = ?",
                                     [result["run_id"]])
    assert (run["kind"], run["status"]) == ("quantize", "succeeded")
    stored = json.loads(run["config"])
    assert stored["method"] == "pow2"
    method_configs = _configs_of_type(stored, "pow2")  # as asked for, and as resolved
    assert method_configs and all(
        (c["bits"], c["group_size"], c["symmetric"]) == (4, 32, True) for c in method_configs)
    assert _configs_of_type(json.loads((out / "openpto.json").read_text()), "pow2")

    listed = _opt(["plugins", "--json"], plugin_sites["good"], db)
    report = json.loads(listed.stdout)
    [pow2] = [p for p in report["plugins"] if p["name"] == "pow2"]
    assert pow2 == {"name": "pow2", "builtin": False, "distribution": "openpto-pow2 0.1",
                    "registered": {"methods": ["pow2"]}}


def test_broken_plugins_warn_once_and_the_cli_keeps_working(
    plugin_sites: dict[str, Path], tmp_path: Path
) -> None:
    done = _opt(["info", "--json"], plugin_sites["broken"], tmp_path / "opt.db")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert "torch" in info["quantization_backends"]
    warned = [line for line in done.stderr.splitlines() if "PluginLoadWarning" in line]
    assert len(warned) == 2, done.stderr
    [import_failure] = [line for line in warned if "'broken-import'" in line]
    assert "openpto-broken 0.1" in import_failure
    assert "ModuleNotFoundError" in import_failure
    assert "openpto_no_such_dependency" in import_failure
    [hook_failure] = [line for line in warned if "'broken-hook'" in line]
    assert "RuntimeError: this hook always fails" in hook_failure

    listed = _opt(["plugins", "--json"], plugin_sites["broken"], tmp_path / "opt.db")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert sorted(f["name"] for f in report["failed"]) == ["broken-hook", "broken-import"]
    names = [p["name"] for p in report["plugins"]]
    assert "broken-hook" not in names and "openpto.default_plugins.kernels" in names
    # The failing hook registered a kernel before raising: none of it was kept.
    kernels = {k for p in report["plugins"] for k in p["registered"].get("kernels", [])}
    assert "half-made-kernel" not in kernels and "packed-int4-cpu" in kernels


class RaisingPlugin:
    @hookimpl
    def register_quantization_backends(self, register: Any) -> None:
        register("never-seen", "nowhere:Backend")
        raise ValueError("backend table is corrupt")


def test_a_hook_that_raises_is_reported_once_in_this_process() -> None:
    with pytest.warns(PluginLoadWarning, match=r"'raising-backends'.*ValueError") as caught, \
            registered_plugin(RaisingPlugin(), "raising-backends"):
        assert "never-seen" not in QUANT_BACKENDS
        assert "torch" in QUANT_BACKENDS
        assert "packed-int4-cpu" in KERNELS
    assert len([w for w in caught if w.category is PluginLoadWarning]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginLoadWarning)
        assert "never-seen" not in QUANT_BACKENDS  # refilled without it, and no second warning
    assert "raising-backends" in {f["name"] for f in plugin_report()["failed"]}


class DuplicateKernelPlugin:
    @hookimpl
    def register_kernels(self, register: Any) -> None:
        register("packed-int4-cpu", "somewhere:Faster")


def test_a_plugin_cannot_take_a_built_in_name() -> None:
    with pytest.warns(PluginLoadWarning, match="'packed-int4-cpu', which plugin "
                                               "'openpto.default_plugins.kernels'"), \
            registered_plugin(DuplicateKernelPlugin(), "duplicate-kernel"):
        assert KERNELS.owners()["packed-int4-cpu"] == "openpto.default_plugins.kernels"


def test_registries_load_lazily_and_import_no_entry() -> None:
    """Reading every registry's names runs the hooks but imports none of the entries (no torch),
    and ``import openpto`` alone loads no plugin at all."""
    code = textwrap.dedent("""
        import sys
        import openpto
        assert "openpto.plugins" not in sys.modules and "pluggy" not in sys.modules
        from openpto.registry import EXPORTERS, GENERATION_BACKENDS, KERNELS, QUANT_BACKENDS
        assert "packed-int4-cpu" in KERNELS.names() and "torch" in QUANT_BACKENDS
        assert "gguf" in EXPORTERS and "mlx" in GENERATION_BACKENDS
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if "openpto" in m)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_opt_plugins_lists_the_built_ins(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import run_opt

    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_opt(["plugins"], capsys, monkeypatch)
    assert code == 0
    for word in ("openpto.default_plugins.methods", "gptq", "sparsegpt", "packed-int4-cpu",
                 "pack-quantized", "compressed-tensors", "llamacpp"):
        assert word in out
    code, out, _ = run_opt(["plugins", "--json"], capsys, monkeypatch)
    report = json.loads(out)
    [methods] = [p for p in report["plugins"] if p["name"] == "openpto.default_plugins.methods"]
    assert methods["builtin"] and methods["registered"] == {
        "methods": ["awq", "gptq", "magnitude", "rtn", "sparsegpt", "wanda"]}
    code, out, _ = run_opt(["plugins", "--help"], capsys, monkeypatch)
    assert code == 0 and "Example: opt plugins --json" in out


class UnimportableEntriesPlugin:
    @hookimpl
    def register_quantization_backends(self, register: Any) -> None:
        register("ghost", "openpto_ghost_backend:GhostBackend")

    @hookimpl
    def register_kernels(self, register: Any) -> None:
        register("ghost-kernel", "openpto.kernels.torch_ops:NoSuchKernel")


def test_an_entry_that_cannot_be_imported_is_one_clear_error(
    tmp_db: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from openpto.errors import PluginError
    from tests.helpers import run_opt

    with registered_plugin(UnimportableEntriesPlugin(), "ghosts"):
        with pytest.raises(PluginError, match=r"kernel 'ghost-kernel' of plugin 'ghosts' cannot "
                                              r"be imported .*AttributeError"):
            KERNELS.get("ghost-kernel")
        code, out, err = run_opt(["info", "--json"], capsys, monkeypatch)
        assert code == 0, err
        ghost = json.loads(out)["quantization_backends"]["ghost"]
        assert not ghost["available"] and "ModuleNotFoundError" in ghost["reason"]
        code, out, err = run_opt(["quantize", "--backend", "ghost", "--json"], capsys,
                                 monkeypatch)
        assert code != 0 and out == ""
        assert err.startswith("error: quantization backend 'ghost' of plugin 'ghosts'"), err
