"""Loaders for artifact formats other than ``dense``, registered in ``ARTIFACT_LOADERS``.

``load_model`` hands every loader one ``ArtifactRequest`` (folder, ``openpto.json``, dtype,
device). The ``pack-quantized`` loader has the float parts loaded with transformers (packed
Linears as placeholders), reads each Linear's packed tensors and swaps in a ``QuantLinear`` that
keeps them packed and runs a real kernel, so resident memory is the packed size, not the float
one. The ``sparse-bitmask`` and ``sparse-24-bitmask`` loader decompresses each pruned weight into
its Linear (in the dtype asked for) and, for 2:4 on CUDA, tries the semi-structured kernel. Only
their own library reads bitsandbytes, quanto and MLX weights, so those loaders build the model
themselves, without a float load first.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from openpto.errors import CorruptFile, UnsupportedModel
from openpto.models.loaded import LoadedModel

if TYPE_CHECKING:
    from openpto.models.loader import ArtifactRequest


def _schemes(qconfig: dict[str, Any]) -> list[tuple[list[str], dict[str, Any]]]:
    groups = qconfig.get("config_groups") or {}
    return [(list(g.get("targets") or []), dict(g.get("weights") or {})) for g in groups.values()]


def _scheme_for(name: str, module_type: str, schemes: list[tuple[list[str], dict[str, Any]]]
                ) -> dict[str, Any] | None:
    for targets, weights in schemes:
        for target in targets:
            if target.startswith("re:"):
                if re.match(target[3:], name):
                    return weights
            elif target in (module_type, name):
                return weights
    return None


def read_packed_weights(folder: Path, model: nn.Module | None) -> dict[str, Any]:
    """Every packed Linear of the folder as a ``QuantizedWeight`` (codes unpacked to uint8).

    Without a ``model`` every packed module is taken to be a ``Linear`` (the only type our
    artifacts pack), for readers that never build the model (exporters)."""
    from safetensors import safe_open

    from openpto.core.quant.primitives import unpack_int32
    from openpto.core.quant.tensor import QuantizedWeight

    config = json.loads((folder / "config.json").read_text())
    qconfig = config.get("quantization_config")
    if not isinstance(qconfig, dict) or qconfig.get("format") != "pack-quantized":
        raise CorruptFile(f"{folder}/config.json has no pack-quantized quantization_config")
    schemes = _schemes(qconfig)
    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, QuantizedWeight] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(k for k in keys if k.endswith(".weight_packed")):
                name = key.removesuffix(".weight_packed")
                module_type = type(model.get_submodule(name)).__name__ if model else "Linear"
                scheme = _scheme_for(name, module_type, schemes)
                if scheme is None:
                    raise CorruptFile(f"{file}: {name} is packed but no config group targets it")
                bits = int(scheme["num_bits"])
                symmetric = bool(scheme.get("symmetric", True))
                out_f, in_f = (int(v) for v in f.get_tensor(f"{name}.weight_shape").tolist())
                q = unpack_int32(f.get_tensor(key), bits, (out_f, in_f))
                scale = f.get_tensor(f"{name}.weight_scale").float()
                groups = scale.shape[1]
                if symmetric:
                    zero = torch.full_like(scale, float(2 ** (bits - 1)))
                else:
                    zp = f.get_tensor(f"{name}.weight_zero_point")
                    zero = unpack_int32(zp, bits, (out_f, groups), packed_dim=0).float()
                out[name] = QuantizedWeight(q, scale, zero, bits, in_f // groups, symmetric)
    if not out:
        raise CorruptFile(f"{folder} says pack-quantized but holds no weight_packed tensors")
    return out


def _release_freed_memory() -> None:
    """Hand the float placeholders' freed memory back to the OS.

    glibc keeps freed heap memory mapped (its mmap threshold grows after large frees), so without
    ``malloc_trim`` the loaded int4 model kept the float model's footprint: 1.16 GB resident
    against 0.46 GB after trimming, for the default model. Elsewhere this is a no-op.
    """
    import ctypes
    import ctypes.util
    import gc
    import sys

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def load_pack_quantized(request: ArtifactRequest, kernel: str = "auto") -> LoadedModel:
    """Swap every packed Linear of the artifact for a ``QuantLinear`` on its kernel."""
    from openpto.kernels import model_kernel_summary, swap_to_packed

    loaded = request.float_model()
    folder = Path(loaded.path)
    model = loaded.model
    quantized = read_packed_weights(folder, model)
    for name, qw in quantized.items():
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise UnsupportedModel(f"{folder}: {name} is packed but the model has no Linear there")
        # One at a time, so at most one Linear's unpacked codes exist besides the packed model.
        swap_to_packed(model, {name: qw}, kernel)
    del quantized
    _release_freed_memory()
    summary = model_kernel_summary(model)
    packed = {k: v for k, v in summary.items() if k != "dense"}
    metadata = dict(loaded.metadata)
    # The kernel most Linears run on labels every measurement made with this model.
    metadata["kernel"] = max(packed, key=lambda k: packed[k]) if packed else "dense"
    metadata["kernels"] = summary
    loaded.metadata = metadata
    return loaded


def wants_sparse24(metadata: dict[str, Any], device: torch.device) -> bool:
    """Whether a loaded artifact should try cuSPARSELt: its ``openpto.json`` says the weights
    were pruned 2:4 and the model is on CUDA. Nowhere else is there a semi-structured kernel."""
    sparsity = metadata.get("sparsity") or {}
    return device.type == "cuda" and sparsity.get("pattern") == "2:4"


def use_sparse24(loaded: LoadedModel) -> LoadedModel:
    """Put a 2:4 artifact's pruned Linears on the semi-structured path when on CUDA.

    ``swap_artifact`` times each weight shape dense against cuSPARSELt and swaps only the shapes
    where it measured sparse faster (float32 weights, which cuSPARSELt does not take, stay
    dense with that reason). ``metadata["kernels"]`` counts the outcome and ``sparse24`` keeps
    each Linear's verdict, so every measurement says which path ran. Elsewhere a no-op.
    """
    if not wants_sparse24(loaded.metadata, loaded.device):
        return loaded
    from openpto.kernels.sparse24 import KERNEL_NAME, swap_artifact

    outcome = swap_artifact(loaded.model, loaded.metadata)
    swapped = sum(1 for verdict in outcome.values() if verdict == KERNEL_NAME)
    linears = sum(1 for m in loaded.model.modules() if isinstance(m, nn.Linear))
    kernels = {"dense": linears, KERNEL_NAME: swapped} if swapped else {"dense": linears}
    loaded.metadata = {**loaded.metadata, "kernel": KERNEL_NAME if swapped else "dense",
                       "kernels": kernels, "sparse24": outcome}
    return loaded


def load_sparse(request: ArtifactRequest) -> LoadedModel:
    """Decompress every pruned Linear of a ``sparse-bitmask``/``sparse-24-bitmask`` artifact
    into the loaded model, at the model's dtype and device; then the 2:4 path where it runs."""
    from openpto.models.sparse_format import read_sparse_weights

    loaded = request.float_model()
    folder = Path(loaded.path)
    model = loaded.model
    for name, dense in read_sparse_weights(folder).items():
        module_name = name.removesuffix(".weight")
        module = model.get_submodule(module_name)
        if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != tuple(dense.shape):
            raise UnsupportedModel(f"{folder}: {module_name} is stored sparse with shape "
                                   f"{tuple(dense.shape)} but the model has no such Linear")
        weight = module.weight
        weight.data = dense.to(weight.device, weight.dtype)
    _release_freed_memory()
    return use_sparse24(loaded)


def load_bitsandbytes(request: ArtifactRequest) -> LoadedModel:
    """A folder saved by the ``bitsandbytes`` backend: transformers reads its own
    ``quantization_config`` and builds ``Linear4bit``/``Linear8bitLt`` modules, placed on
    the device as they load (bitsandbytes modules cannot be moved afterwards)."""
    from transformers import AutoModelForCausalLM

    request.check_folder()
    _import_library("bitsandbytes", "bitsandbytes", "bitsandbytes artifacts")
    model = AutoModelForCausalLM.from_pretrained(request.folder, dtype=request.dtype,  # nosec B615  # local folder
                                                 device_map=str(request.device))
    return request.loaded(model.eval())


def load_quanto(request: ArtifactRequest) -> LoadedModel:
    """A folder saved by the ``quanto`` backend (optimum-quanto's own serialisation), in the
    float dtype it was saved in: quanto refuses to change a 4-bit weight's dtype."""
    from openpto.errors import UsageError

    request.check_folder()
    folder, dtype = request.folder, request.dtype
    quanto = _import_library("optimum.quanto", "optimum-quanto", "quanto artifacts")
    model = quanto.QuantizedModelForCausalLM.from_pretrained(str(folder))._wrapped
    saved = next(model.parameters()).dtype
    if isinstance(dtype, torch.dtype) and dtype != saved:
        name = str(saved).removeprefix("torch.")
        raise UsageError(f"{folder} is a quanto artifact saved in {name}; quanto cannot change "
                         f"its dtype: pass --dtype {name} (or auto)")
    for module in model.modules():
        if isinstance(module, quanto.QModuleMixin):
            module.forward = _outside_inference_mode(module.forward)
    return request.loaded(model.to(request.device).eval())


def _outside_inference_mode(forward: Callable[..., Any]) -> Callable[..., Any]:
    """quanto's 4-bit weights cannot run under ``torch.inference_mode`` (their transpose sets a
    version counter: "Cannot set version_counter for inference tensor"), which our decode loop
    uses. Only the quantized module leaves inference mode, still without autograd; its inputs
    are only read, so inference tensors may flow in."""

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.no_grad():
            return forward(*args, **kwargs)

    return run


def _import_library(module: str, dist: str, purpose: str) -> Any:
    """The library an artifact format needs, or one line naming the package to install (or why
    the installed one cannot load: bitsandbytes raises ``RuntimeError`` without its binary)."""
    import importlib

    from openpto.errors import BackendUnavailable, MissingDependency

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(dist, "backends", purpose) from exc
    except (RuntimeError, OSError) as exc:
        raise BackendUnavailable(f"{dist} is installed but cannot load: {exc}") from exc


def load_mlx(request: ArtifactRequest) -> LoadedModel:
    """MLX folders hold MLX arrays: torch cannot run them."""
    raise UnsupportedModel(
        f"{request.folder} is an MLX folder: run it with mlx_lm (mlx_lm.generate --model PATH) "
        "or opt serve --backend mlx"
    )
