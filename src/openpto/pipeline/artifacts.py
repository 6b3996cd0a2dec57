"""Artifact folders: what ``opt quantize`` writes and every loader (ours, transformers, vLLM) reads.

An artifact is a Hugging Face folder: ``config.json`` (with compressed-tensors'
``quantization_config`` when weights are packed), the tokenizer files, ``model.safetensors`` and
``openpto.json`` (method configs, source model and its sha256, openpto version, metrics at
creation, ``format``). Quantized Linears are stored in compressed-tensors' ``pack-quantized``
layout — ``weight_packed`` (int32, dense bit packing), ``weight_scale``, ``weight_zero_point``
(asymmetric only, packed along the output dim) and ``weight_shape``. Pruned Linears that are not
quantized are stored in compressed-tensors' sparse layouts (``sparse-bitmask``, or
``sparse-24-bitmask`` for 2:4; see ``openpto.models.sparse_format``), described by the
``sparsity_config`` inside ``quantization_config``. Every other float tensor is stored in
``float_dtype`` (bfloat16 unless asked otherwise: a float32 embedding would otherwise be most of
an int4 artifact), recorded as ``config.json``'s ``dtype``.

Writing is atomic: everything goes into a hidden sibling folder that is renamed into place only
once complete, so an interrupted or failed run never leaves a folder that looks like an artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from openpto.core.quant.primitives import pack_int32
from openpto.core.quant.tensor import QuantizedWeight
from openpto.errors import UsageError, WriteError
from openpto.models import sparse_format
from openpto.models.resolve import ARTIFACT_FILE

if TYPE_CHECKING:
    from openpto.store import Store

FORMAT_PACKED = "pack-quantized"
FORMAT_DENSE = "dense"
WEIGHTS_FILE = "model.safetensors"
#: what ``float_dtype`` may name; ``None`` or ``"keep"`` stores each tensor in its own dtype
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
#: bfloat16 rather than float16: it stores a bfloat16 checkpoint (most published ones) without
#: rounding and holds float32's range (float16 stops at 65504 and loses bits below 6e-5); on the
#: default model's int4 artifact the two moved perplexity by far less than the quantization did
DEFAULT_FLOAT_DTYPE = "bfloat16"


def stored_float_dtype(float_dtype: str | torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """The dtype a float tensor of ``dtype`` is stored in under ``float_dtype``."""
    if float_dtype is None or float_dtype == "keep":
        return dtype
    if isinstance(float_dtype, torch.dtype) and float_dtype.is_floating_point:
        return float_dtype
    if float_dtype in FLOAT_DTYPES:
        return getattr(torch, str(float_dtype))  # type: ignore[no-any-return]
    raise UsageError(f"unknown float_dtype {float_dtype!r} (choose from "
                     f"{', '.join(FLOAT_DTYPES)}, or keep)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class SparseLayout:
    """Which Linears were pruned and how, for storing them in a compressed-tensors sparse layout.

    ``structure`` is ``"2:4"``, another ``"N:M"`` or ``"unstructured"``; ``sparsity`` the
    measured fraction of zeros over ``targets`` (a plan's expected fraction for ``--dry-run``).
    ``compress=False`` keeps the weights dense and only describes the sparsity (format
    ``dense``), as a joint sparse + quantized artifact always does: compressed-tensors has no
    bitmask over packed int4 codes.
    """

    structure: str
    targets: tuple[str, ...]
    sparsity: float
    compress: bool = True

    def format_for(self, quantized: Iterable[str]) -> str:
        if not self.compress or set(self.targets) & set(quantized):
            return FORMAT_DENSE
        return sparse_format.format_for(self.structure)

    def compressed_targets(self, quantized: Iterable[str]) -> tuple[str, ...]:
        done = set(quantized)
        return tuple(t for t in self.targets if t not in done) \
            if self.format_for(quantized) != FORMAT_DENSE else ()


def scale_dtype_for(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are stored in: the model's half dtype, or float16 for a float32 model.

    float16 keeps 11 mantissa bits (a 0.05% scale error at most, far below a 4-bit step) and is
    what GGUF's Q4_0/Q4_1 blocks store, so a group-32 artifact maps onto them without rounding.
    """
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def as_stored(qw: QuantizedWeight, scale_dtype: torch.dtype) -> QuantizedWeight:
    """The weight exactly as the artifact will hold it: scales rounded to their storage dtype."""
    scale = qw.scale.to(scale_dtype).float()
    return QuantizedWeight(qw.q, scale, qw.zero, qw.bits, qw.group_size, qw.symmetric)


def packed_tensors(qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One Linear's tensors in the ``pack-quantized`` layout (names without the module prefix)."""
    tensors = {
        "weight_packed": pack_int32(qw.q, qw.bits),
        "weight_scale": qw.scale.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([qw.out_features, qw.in_features], dtype=torch.int64),
    }
    if not qw.symmetric:
        # compressed-tensors keeps signed zero points offset by 2**(bits-1) — our unsigned zero.
        zero = qw.zero.round().clamp(0, 2**qw.bits - 1).to(torch.uint8)
        tensors["weight_zero_point"] = pack_int32(zero, qw.bits, packed_dim=0)
    return tensors


@dataclass(frozen=True)
class WeightPlan:
    """What one Linear will become, known before any calibration (for ``--dry-run``)."""

    out_features: int
    in_features: int
    bits: int
    group_size: int  # in_features when per-channel
    symmetric: bool

    def nbytes(self, scale_dtype: torch.dtype) -> int:
        words = -(-self.in_features * self.bits // 32)
        groups = self.in_features // self.group_size
        size = self.out_features * words * 4
        size += self.out_features * groups * torch.empty((), dtype=scale_dtype).element_size()
        size += 2 * 8  # weight_shape
        if not self.symmetric:
            size += -(-self.out_features * self.bits // 32) * groups * 4
        return size

    @staticmethod
    def of(qw: QuantizedWeight) -> WeightPlan:
        return WeightPlan(qw.out_features, qw.in_features, qw.bits, qw.group_size, qw.symmetric)


def quantization_config(
    plans: Mapping[str, WeightPlan], linear_names: Iterable[str]
) -> dict[str, Any]:
    """compressed-tensors' ``quantization_config``: one config group per distinct scheme, and
    every Linear left in float (the head at least) listed under ``ignore``."""
    schemes: dict[tuple[int, int | None, bool], list[str]] = {}
    for name, plan in plans.items():
        group = None if plan.group_size == plan.in_features else plan.group_size
        schemes.setdefault((plan.bits, group, plan.symmetric), []).append(name)
    groups: dict[str, Any] = {}
    for index, ((bits, group, symmetric), names) in enumerate(sorted(schemes.items(), key=str)):
        # One scheme covers all Linears ("Linear"); several need the module names spelled out.
        targets = ["Linear"] if len(schemes) == 1 else [f"re:^{n}$" for n in sorted(names)]
        groups[f"group_{index}"] = {
            "targets": targets,
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": symmetric,
                "strategy": "group" if group is not None else "channel",
                "group_size": group,
                "dynamic": False,
                "actorder": None,
                "block_structure": None,
                "observer": "minmax",
                "observer_kwargs": {},
            },
            "input_activations": None,
            "output_activations": None,
        }
    ignore = sorted(set(linear_names) - set(plans))
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT_PACKED,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once (the first name), as safetensors requires;
    transformers re-ties them from ``tie_word_embeddings`` on load."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _stored(tensor: torch.Tensor, float_dtype: str | torch.dtype | None,
            name: str = "a tensor") -> torch.Tensor:
    """``tensor`` in its storage dtype; a value the dtype cannot hold is refused, not made inf."""
    if not tensor.is_floating_point():
        return tensor
    target = stored_float_dtype(float_dtype, tensor.dtype)
    if target == tensor.dtype:
        return tensor
    limit = torch.finfo(target).max
    if tensor.numel() and float(tensor.detach().abs().max()) > limit:
        raise UsageError(f"{name} holds values beyond {_dtype_name(target)}'s range "
                         f"({limit:g}); store it as bfloat16 or float32")
    return tensor.to(target)


def artifact_tensors(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], scale_dtype: torch.dtype,
    float_dtype: str | torch.dtype | None = DEFAULT_FLOAT_DTYPE,
    sparsity: SparseLayout | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the artifact: packed Linears, compressed sparse Linears, and the rest
    in ``float_dtype``."""
    compressed = set(sparsity.compressed_targets(quantized)) if sparsity else set()
    fmt = sparsity.format_for(quantized) if sparsity else FORMAT_DENSE
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in _unique_state(model).items():
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            continue
        stored = _stored(tensor.detach().cpu(), float_dtype, name)
        if module in compressed and leaf == "weight":
            for part, value in sparse_format.compress(stored, fmt).items():
                tensors[f"{module}.{part}"] = value
            continue
        tensors[name] = stored.contiguous()
    for module, qw in quantized.items():
        for leaf, tensor in packed_tensors(qw.to("cpu"), scale_dtype).items():
            tensors[f"{module}.{leaf}"] = tensor
    return tensors


_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
    torch.int64: "I64", torch.uint8: "U8", torch.int8: "I8", torch.float64: "F64",
    torch.bool: "BOOL",
}


def planned_tensors(
    model: nn.Module, plans: Mapping[str, WeightPlan], scale_dtype: torch.dtype,
    float_dtype: str | torch.dtype | None = DEFAULT_FLOAT_DTYPE,
    sparsity: SparseLayout | None = None,
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name -> (dtype, shape) of every tensor the artifact will hold, without computing any
    (a sparse layout's kept count is its expected one: ``sparsity.sparsity`` of each weight)."""
    compressed = set(sparsity.compressed_targets(plans)) if sparsity else set()
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for name, tensor in _unique_state(model).items():
        module, _, leaf = name.rpartition(".")
        if module in plans and leaf == "weight":
            continue
        dtype = stored_float_dtype(float_dtype, tensor.dtype) if tensor.is_floating_point() \
            else tensor.dtype
        if module in compressed and leaf == "weight" and sparsity is not None:
            rows, cols = tensor.shape
            fmt = sparsity.format_for(plans)
            for part, spec in sparse_format.planned_tensors(
                    rows, cols, fmt, dtype, sparsity.sparsity).items():
                specs[f"{module}.{part}"] = spec
            continue
        specs[name] = (dtype, tuple(tensor.shape))
    for module, p in plans.items():
        groups = p.in_features // p.group_size
        words = -(-p.in_features * p.bits // 32)
        specs[f"{module}.weight_packed"] = (torch.int32, (p.out_features, words))
        specs[f"{module}.weight_scale"] = (scale_dtype, (p.out_features, groups))
        specs[f"{module}.weight_shape"] = (torch.int64, (2,))
        if not p.symmetric:
            zero_words = -(-p.out_features * p.bits // 32)
            specs[f"{module}.weight_zero_point"] = (torch.int32, (zero_words, groups))
    return specs


def safetensors_size(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """The exact size of a safetensors file holding tensors of these dtypes and shapes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in specs.items():
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": _ST_DTYPES[dtype], "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    return 8 + -(-len(text) // 8) * 8 + offset


def compression_config(
    model: nn.Module, plans: Mapping[str, WeightPlan], sparsity: SparseLayout | None
) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config``: compressed-tensors' quantization config for
    packed Linears and its ``sparsity_config`` for pruned ones (``None`` for a dense model)."""
    linears = linear_names(model)
    qconfig = quantization_config(plans, linears) if plans else None
    if sparsity is None:
        return qconfig
    config = qconfig or {"quant_method": "compressed-tensors"}
    config["sparsity_config"] = sparse_format.sparsity_config(
        sparsity.format_for(plans), sparsity.structure, sparsity.targets, linears,
        sparsity.sparsity)
    return config


def planned_size(
    model: nn.Module, tokenizer: Any, plans: Mapping[str, WeightPlan], scale_dtype: torch.dtype,
    metadata: dict[str, Any] | None = None, *,
    float_dtype: str | torch.dtype | None = DEFAULT_FLOAT_DTYPE,
    sparsity: SparseLayout | None = None,
) -> int:
    """The artifact's size on disk before any work: the safetensors file (exact for packed and
    dense tensors; a bitmask layout's values assume ``sparsity.sparsity`` zeros), and the
    config, tokenizer and ``openpto.json`` files written to a scratch folder (the metrics that
    ``openpto.json`` gains at the end are a few hundred bytes)."""
    config = compression_config(model, plans, sparsity)
    dtype = _float_dtype_of(model, float_dtype)
    small_files = small_files_size(model, tokenizer, config, metadata, dtype)
    specs = planned_tensors(model, plans, scale_dtype, float_dtype, sparsity)
    return safetensors_size(specs) + small_files + 400


def _float_dtype_of(model: nn.Module, float_dtype: str | torch.dtype | None) -> torch.dtype:
    return stored_float_dtype(float_dtype, next(model.parameters()).dtype)


def small_files_size(model: nn.Module, tokenizer: Any, qconfig: dict[str, Any] | None,
                     metadata: dict[str, Any] | None, dtype: torch.dtype | None = None) -> int:
    """Bytes of everything but the weights (config, tokenizer, ``openpto.json``), measured by
    writing them to a scratch folder."""
    with tempfile.TemporaryDirectory(prefix="openpto-size-") as scratch:
        folder = Path(scratch)
        _write_config(model, folder, qconfig, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / ARTIFACT_FILE).write_text(json.dumps(metadata or {}, indent=2, default=str))
        return folder_size(folder)


def round_to_stored(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight],
    float_dtype: str | torch.dtype | None = DEFAULT_FLOAT_DTYPE,
) -> dict[str, QuantizedWeight]:
    """Make ``model`` compute with exactly what ``write_artifact`` will store, and return the
    quantized weights to hand it.

    Scales are rounded to their storage dtype and each quantized Linear's weight becomes its
    dequantized codes; every other float tensor is rounded to the stored float dtype (keeping
    the model's dtype), so a perplexity measured in memory is the artifact's. Pruned entries
    stay exact zeros (a zero code sits on the zero point; a zero rounds to zero).
    """
    scale_dtype = scale_dtype_for(next(model.parameters()).dtype)
    stored = {name: as_stored(qw, scale_dtype) for name, qw in quantized.items()}
    for name, qw in stored.items():
        weight = model.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        weight.data = qw.dequantize(weight.dtype).to(weight.device)
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if (module in stored and leaf == "weight") or not tensor.is_floating_point():
            continue
        # In place, so tied tensors (embedding and head) stay one tensor.
        tensor.copy_(_stored(tensor, float_dtype, name))
    return stored


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# Writing


def check_output(output: Path) -> None:
    """Refuse, before any calibration work, an output that cannot become an artifact folder:
    an existing file, a non-empty folder that is not an artifact, or a place we cannot write."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; give a folder path")
    if output.is_dir() and any(output.iterdir()) and not (output / ARTIFACT_FILE).is_file():
        raise UsageError(
            f"--output {output} is a non-empty folder that is not an openpto artifact; "
            "choose a new or empty folder"
        )
    parent = output.parent
    # The first existing ancestor must be writable: the folder and its parents get created there.
    ancestor = parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the artifact: {ancestor} is not a writable folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{output.name}.probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"cannot write the artifact under {parent}: {reason}") from exc


def _write_config(model: nn.Module, folder: Path, qconfig: dict[str, Any] | None,
                  dtype: torch.dtype | None = None) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise UsageError("the model has no Hugging Face config; cannot write an artifact folder")
    data = config.to_dict()
    data.pop("quantization_config", None)
    if qconfig is not None:
        data["quantization_config"] = qconfig
    if dtype is not None:
        # transformers 5 reads ``dtype``; older readers (and vLLM's) read ``torch_dtype``.
        data["dtype"] = data["torch_dtype"] = _dtype_name(dtype)
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    (folder / "config.json").write_text(text + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


@dataclass(frozen=True)
class ArtifactInfo:
    path: Path
    format: str
    size_bytes: int
    tensor_bytes: int


def write_artifact(
    model: nn.Module,
    tokenizer: Any,
    output: Path,
    quantized: Mapping[str, QuantizedWeight],
    metadata: dict[str, Any],
    *,
    float_dtype: str | torch.dtype | None = DEFAULT_FLOAT_DTYPE,
    sparsity: SparseLayout | None = None,
) -> ArtifactInfo:
    """Write the artifact folder atomically (temporary sibling, then rename) and return its size.

    ``quantized`` weights must already hold their stored scales (see ``round_to_stored``, which
    also makes the model compute with what is stored). An empty mapping and no ``sparsity``
    write a ``dense`` artifact; ``sparsity`` alone a ``sparse-bitmask`` or
    ``sparse-24-bitmask`` one. ``float_dtype``: ``"bfloat16"`` (default), ``"float16"``,
    ``"float32"``, or ``None``/``"keep"`` for each tensor's own dtype.
    """
    from safetensors.torch import save_file

    output = Path(output)
    check_output(output)
    model_dtype = next(model.parameters()).dtype
    dtype = stored_float_dtype(float_dtype, model_dtype)
    scale_dtype = scale_dtype_for(model_dtype)
    sparse_fmt = sparsity.format_for(quantized) if sparsity else None
    fmt = FORMAT_PACKED if quantized else (sparse_fmt or FORMAT_DENSE)
    if fmt == FORMAT_DENSE and sparse_fmt == FORMAT_DENSE:
        sparsity = None  # dense weights say their sparsity in openpto.json only
    plans = {name: WeightPlan.of(qw) for name, qw in quantized.items()}
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        _write_config(model, tmp, compression_config(model, plans, sparsity), dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        tensors = artifact_tensors(model, quantized, scale_dtype, float_dtype, sparsity)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        # safetensors creates the file owner-only; give it the mode the other files get.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp / WEIGHTS_FILE, 0o666 & ~umask)
        tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        info = {
            **metadata,
            "format": fmt,
            "float_dtype": _dtype_name(dtype),
            "scale_dtype": _dtype_name(scale_dtype) if quantized else None,
        }
        if sparse_fmt is not None:
            info["sparse_format"] = sparse_fmt
        # openpto.json goes last: its presence is what makes a folder an artifact.
        (tmp / ARTIFACT_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        _replace(tmp, output)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(output, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ArtifactInfo(output, fmt, folder_size(output), tensor_bytes)


@contextmanager
def staged_folder(output: Path, metadata: dict[str, Any], fmt: str) -> Iterator[Path]:
    """Yield a hidden sibling path for a backend to write its folder into; on success write
    ``openpto.json`` last (its presence marks a complete artifact) and move the folder into place,
    on failure remove it."""
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        info = {**metadata, "format": fmt}
        (tmp / ARTIFACT_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        _replace(tmp, output)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(output, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_error(output: Path, exc: OSError) -> WriteError:
    """The one-line error for a failed write; the partial folder is already removed and an
    older artifact at ``output`` is left as it was."""
    reason = exc.strerror or str(exc)
    return WriteError(f"cannot write the artifact {output}: {reason}"
                      + (f" ({exc.filename})" if exc.filename else "")
                      + "; nothing was left half-written")


def _replace(tmp: Path, output: Path) -> None:
    """Move ``tmp`` to ``output``; an older artifact there is moved aside first, then removed."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
    try:
        os.replace(tmp, output)
    except OSError:
        if old is not None:
            os.replace(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def record_model(
    store: Store, info: ArtifactInfo, source_model: str, method: str,
    config: dict[str, Any], run_id: str,
) -> str:
    """Add the artifact to the ``models`` table (replacing any row for the same path)."""
    from openpto.store.db import new_id, now_iso

    path = str(info.path.resolve())
    if "models" in store.db.table_names():
        with store.db.conn:
            store.db["models"].delete_where("path = ?", [path])  # type: ignore[union-attr]
    model_id = new_id()
    store.insert(
        "models",
        {
            "id": model_id, "path": path, "source_model": source_model, "method": method,
            "config": config, "size_bytes": info.size_bytes, "created_at": now_iso(),
            "run_id": run_id,
        },
    )
    return model_id
