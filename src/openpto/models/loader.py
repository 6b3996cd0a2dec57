"""``load_model``: any MODEL argument -> a ``LoadedModel`` on the requested device and dtype.

GGUF files (the default alias included) are converted once to float safetensors under
``OPT_HOME/cache/models`` and loaded from there; folders are checked before transformers sees them
so that a missing, corrupt or unsupported model fails with one clear line.
"""

from __future__ import annotations

import contextlib
import json
import pickle  # nosec B403  # only its exception class is used
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openpto.errors import (
    BackendUnavailable,
    CorruptFile,
    ModelNotFound,
    UnsupportedModel,
    UsageError,
)
from openpto.models.cache import files_sha256
from openpto.models.loaded import LoadedModel
from openpto.models.resolve import ARTIFACT_FILE, ModelSource, resolve_model
from openpto.progress import ProgressReporter

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")
DTYPE_SYNONYMS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """``"float32"|"bfloat16"|"float16"`` (or a ``torch.dtype``) -> dtype; ``"auto"`` stays a string
    and means the checkpoint's own dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise UsageError(f"model dtype must be a float type, not {dtype}")
        return dtype
    dtype = DTYPE_SYNONYMS.get(dtype, dtype)
    if dtype == "auto":
        return "auto"
    if dtype in DTYPE_NAMES:
        return getattr(torch, dtype)  # type: ignore[no-any-return]
    raise UsageError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_NAMES)})")


def parse_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA, else MPS, else CPU); a device this
    machine lacks raises ``BackendUnavailable``."""
    import torch

    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {device!r} (cpu, cuda, cuda:N, mps or auto)") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "torch was built without CUDA"
                if torch.version.cuda is None
                else "no CUDA device is visible"
            )
            raise BackendUnavailable(f"device {device!r} is not available: {why}")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise BackendUnavailable(f"device {device!r} is not available: {count} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise BackendUnavailable(f"device {device!r} is not available: MPS needs Apple Silicon")
        return dev
    raise UsageError(f"unsupported device {device!r} (cpu, cuda, cuda:N, mps or auto)")


def weight_files(folder: Path) -> list[Path]:
    """The folder's weights: safetensors if any (sharded or not), else PyTorch ``.bin`` files."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ModelNotFound(f"{folder} has config.json but no *.safetensors or *.bin weights")
    return files


def check_safetensors(files: list[Path]) -> None:
    """Read each safetensors header; a truncated or foreign file raises ``CorruptFile``.

    The header declares every tensor's byte range, and safetensors refuses a file whose length
    does not match, so this catches truncation without reading the data.
    """
    from safetensors import SafetensorError, safe_open

    for path in files:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as exc:
            raise CorruptFile(f"{path} is not a readable safetensors file: {exc}") from exc


def check_architecture(folder: Path, trust_remote_code: bool) -> dict[str, Any]:
    """Read config.json and make sure transformers has a causal-LM class for its model_type."""
    from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING

    path = folder / "config.json"
    data = read_json_object(path)
    if trust_remote_code and "auto_map" in data:
        return data  # the model ships its own classes, which the user chose to trust
    model_type = data.get("model_type")
    if not model_type:
        raise UnsupportedModel(f"{path} has no model_type")
    if model_type not in CONFIG_MAPPING:
        hint = (
            "; it ships its own code, pass trust_remote_code=True if you trust it"
            if "auto_map" in data
            else ""
        )
        raise UnsupportedModel(
            f"{folder}: transformers has no model class for model_type {model_type!r}{hint}"
        )
    if CONFIG_MAPPING[model_type] not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedModel(
            f"{folder}: model_type {model_type!r} is not a causal language model"
        )
    return data


def _check_folder(folder: Path, trust_remote_code: bool) -> None:
    """Config, weights and tokenizer files present and readable, before any library reads them."""
    check_architecture(folder, trust_remote_code)
    check_safetensors(weight_files(folder))
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFound(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "next to the weights"
        )


def _load_folder(
    folder: Path, dtype: torch.dtype | str, trust_remote_code: bool, drop_quantization: bool = False
) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_folder(folder, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)  # nosec B615  # local folder
    if drop_quantization and hasattr(config, "quantization_config"):
        # The artifact loader swaps in packed modules itself; transformers must not try to.
        del config.quantization_config
    quiet = _transformers_errors_only() if drop_quantization else contextlib.nullcontext()
    try:
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(  # nosec B615  # local folder
                folder, config=config, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as exc:
        # Only .bin checkpoints get here corrupt: safetensors were checked above.
        raise CorruptFile(f"{folder}: a .bin weights file is corrupt or truncated: {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)  # nosec B615  # local folder
    return model, tokenizer


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """Packed artifacts store ``weight_packed``/``weight_scale`` where the float model has
    ``weight``; transformers' load report would list every Linear as missing and unexpected,
    which is exactly what the artifact loader then resolves, so only errors are shown."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` (``CorruptFile`` when it is not valid JSON or not an object)."""
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFile(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CorruptFile(f"{path} does not hold a JSON object")
    return data


def _read_artifact_metadata(folder: Path) -> dict[str, Any]:
    return read_json_object(folder / ARTIFACT_FILE)


def load_model(
    spec: str | ModelSource | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    progress: ProgressReporter | None = None,
) -> LoadedModel:
    """Load any MODEL argument (alias, HF folder, ``.gguf``, artifact, cached hub id) in eval mode.

    Example: ``load_model("smollm2-135m", dtype="bfloat16")``
    """
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    torch_dtype = parse_dtype(dtype)
    target = parse_device(device)
    metadata: dict[str, Any] = {}
    fmt = "dense"
    if source.kind in ("alias", "gguf"):
        from openpto.models.gguf import cached_conversion

        folder, sha = cached_conversion(source.path, _cache_name(source), progress)
        model, tokenizer = _load_folder(folder, torch_dtype, False)
    else:
        folder = source.path
        if source.kind == "artifact":
            metadata = _read_artifact_metadata(folder)
            fmt = str(metadata.get("format", "dense"))
        if fmt != "dense":
            return _load_artifact(ArtifactRequest(source, metadata, torch_dtype, target))
        model, tokenizer = _load_folder(folder, torch_dtype, trust_remote_code)
        sha = files_sha256(weight_files(folder))
    model.eval()
    if target.type != "cpu":
        model.to(target)
    loaded = LoadedModel(model, tokenizer, source.name, source.kind, source.path, sha, metadata)
    if source.kind == "artifact":
        from openpto.models.artifact_loaders import use_sparse24

        loaded = use_sparse24(loaded)  # 2:4 on CUDA only; elsewhere nothing changes
    return loaded


def _cache_name(source: ModelSource) -> str:
    return source.name if source.kind == "alias" else source.path.stem


def hf_folder(source: ModelSource | str | None, progress: ProgressReporter | None = None) -> Path:
    """The Hugging Face folder with the source's weights: for a GGUF source (the default alias
    included) its cached float conversion, made first if needed; else the source's own folder.
    For tools that read folders themselves (mlx-lm, exporters)."""
    if not isinstance(source, ModelSource):
        source = resolve_model(source)
    if source.kind in ("alias", "gguf"):
        from openpto.models.gguf import cached_conversion

        return cached_conversion(source.path, _cache_name(source), progress)[0]
    return source.path


@dataclass(frozen=True)
class ArtifactRequest:
    """What every artifact loader (``openpto.registry.ARTIFACT_LOADERS``) is called with: the
    artifact's source, its ``openpto.json``, and the dtype and device asked for.

    A loader whose weights transformers can build as a float model first (``pack-quantized``)
    calls ``float_model()`` and swaps in its own modules. One whose weights only its own library
    reads (bitsandbytes stores packed uint8 tensors of other shapes, quanto its own tensor
    parts) calls ``check_folder()``, builds the model itself and hands it to ``loaded()``.
    """

    source: ModelSource
    metadata: dict[str, Any]
    dtype: torch.dtype | str
    device: torch.device

    @property
    def folder(self) -> Path:
        return self.source.path

    @property
    def format(self) -> str:
        return str(self.metadata.get("format", "dense"))

    def check_folder(self) -> None:
        """Config, weights and tokenizer present and readable (one clear error otherwise)."""
        _check_folder(self.folder, trust_remote_code=False)

    def float_model(self) -> LoadedModel:
        """The folder through transformers with its ``quantization_config`` set aside (packed
        Linears come up as float placeholders), in eval mode on the requested device: packed
        modules are built on the device of the Linears they replace, so the loader picks the
        kernel of that device."""
        model, tokenizer = _load_folder(self.folder, self.dtype, False, drop_quantization=True)
        model.eval()
        if self.device.type != "cpu":
            model.to(self.device)
        sha = files_sha256(weight_files(self.folder))
        return LoadedModel(model, tokenizer, self.source.name, self.source.kind, self.folder,
                           sha, dict(self.metadata))

    def loaded(self, model: Any) -> LoadedModel:
        """A model the loader built itself, with the folder's tokenizer and provenance; its
        ``kernel`` is the format (its library's own modules run it)."""
        from transformers import AutoTokenizer

        sha = files_sha256(weight_files(self.folder))
        tokenizer = AutoTokenizer.from_pretrained(self.folder)  # nosec B615  # local folder
        return LoadedModel(model, tokenizer, self.source.name, self.source.kind, self.folder, sha,
                           {**self.metadata, "kernel": self.format})


def _load_artifact(request: ArtifactRequest) -> LoadedModel:
    from openpto.registry import ARTIFACT_LOADERS

    if request.format not in ARTIFACT_LOADERS:
        known = ", ".join(["dense", *ARTIFACT_LOADERS.names()])
        raise UnsupportedModel(
            f"{request.folder}: artifact format {request.format!r} has no loader here "
            f"(known: {known})"
        )
    loaded: LoadedModel = ARTIFACT_LOADERS.get(request.format)(request)
    loaded.model.eval()
    return loaded
