"""Turning a MODEL argument into a ``ModelSource``: what it is and where its files are.

Resolution is cheap (no weights are read) and never touches the network: an alias, then an
existing file or folder, then a hub id that is already in the local Hugging Face cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from openpto.errors import ModelNotFound, UnsupportedModel, UsageError
from openpto.models.aliases import ALIASES, DEFAULT_ALIAS, alias_names

KINDS = ("alias", "hf-folder", "gguf", "artifact", "hub-cache")
ARTIFACT_FILE = "openpto.json"


@dataclass(frozen=True)
class ModelSource:
    """``path`` is the GGUF file for ``alias`` and ``gguf``, else the model folder."""

    name: str
    kind: str
    path: Path


def resolve_model(spec: str | None) -> ModelSource:
    """Find what ``spec`` names; ``None`` or ``""`` means the default alias."""
    if not spec:
        spec = DEFAULT_ALIAS
    if spec in ALIASES:
        return ModelSource(spec, "alias", ALIASES[spec].locate())
    path = Path(spec).expanduser()
    if path.exists():
        return _from_path(spec, path)
    if _looks_like_path(spec):
        raise ModelNotFound(f"no such file or folder: {path}")
    cached = _from_hub_cache(spec)
    if cached is not None:
        return cached
    raise ModelNotFound(
        f"{spec!r} is not a model alias (aliases: {', '.join(alias_names())}), an existing file or "
        "folder, or a hub id in the local Hugging Face cache (nothing is downloaded)"
    )


def _looks_like_path(spec: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else with a separator or a file suffix is a path.
    return (
        spec.startswith(("/", ".", "~", "\\"))
        or spec.count("/") > 1
        or "\\" in spec
        or spec.endswith((".gguf", ".safetensors", ".bin", ".json"))
    )


def _from_path(spec: str, path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(spec, "gguf", path)
        raise UnsupportedModel(
            f"{path} is a file but not a .gguf; pass a .gguf file or the folder holding config.json"
        )
    if (path / ARTIFACT_FILE).is_file():
        return ModelSource(spec, "artifact", path)
    if (path / "config.json").is_file():
        return ModelSource(spec, "hf-folder", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(spec, "gguf", ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise UsageError(f"{path} holds several GGUF files ({names}); pass one of them")
    raise ModelNotFound(f"{path} has neither config.json (a Hugging Face folder) nor a .gguf file")


def _from_hub_cache(spec: str) -> ModelSource | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(spec, local_files_only=True))  # nosec B615  # local cache only
    except (HFValidationError, LocalEntryNotFoundError):
        return None
    if not (folder / "config.json").is_file():
        raise ModelNotFound(
            f"{spec} is in the local Hugging Face cache ({folder}) but without config.json; "
            "download it completely first"
        )
    return ModelSource(spec, "hub-cache", folder)
