"""Models created through the Ollama management routes: blobs and manifests on disk.

Layout under the store's root (``OPT_HOME/ollama`` unless the settings name another folder)::

    blobs/sha256-<hex>            uploaded files, stored under their verified digest
    manifests/<name>/<tag>.json   one created, copied or pulled model

A manifest names what the model runs on (an uploaded GGUF blob, or a local MODEL spec: an alias,
an artifact folder, a ``.gguf`` file) plus what ``/api/create`` gave it: template, system,
parameters, license, messages. Files are written to a temporary name and renamed, so a failed
upload or create leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from openpto.serving.errors import APIError

_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
# Ollama's model names: letters, digits, '_', '-', '.', at most one ':' before the tag.
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def canonical(name: str) -> str:
    """``name:tag`` with Ollama's default tag ``latest`` added when none is given."""
    return name if ":" in name else f"{name}:latest"


def check_name(name: str) -> tuple[str, str]:
    """``(model, tag)`` of a valid model name; 400 for a name that could escape the store."""
    if "/" in name or "\\" in name or ".." in name or "\0" in name:
        raise APIError(400, f"invalid model name {name!r}: names are not paths (no '/', '\\' "
                            "or '..')", "invalid_model_name", "model")
    model, _, tag = canonical(name).partition(":")
    if not _PART.match(model) or not _PART.match(tag):
        raise APIError(400, f"invalid model name {name!r}: use letters, digits, '_', '-' and "
                            "'.', optionally ':TAG'", "invalid_model_name", "model")
    return model, tag


def parse_digest(digest: str) -> str:
    """The hex of ``sha256:<hex>`` (or ``sha256-<hex>``); 400 for anything else."""
    match = _DIGEST.match(digest)
    if match is None:
        raise APIError(400, f"invalid digest {digest!r}: expected sha256:<64 hex digits>",
                       "invalid_digest", "digest")
    return match.group(1)


@dataclasses.dataclass
class Manifest:
    name: str  # canonical name:tag
    #: what the engine loads: a GGUF blob digest ("sha256:...") or a local MODEL spec
    blob: str | None = None
    spec: str | None = None
    template: str = ""
    system: str = ""
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    license: str = ""
    messages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    created_at: float = dataclasses.field(default_factory=time.time)

    @property
    def digest(self) -> str:
        """A stable id of the model's content, as Ollama's digest of its manifest is."""
        body = json.dumps({k: v for k, v in dataclasses.asdict(self).items()
                           if k not in ("name", "created_at")}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"

    # -- blobs -------------------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.blobs / f"sha256-{parse_digest(digest)}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    async def write_blob(self, digest: str, chunks: AsyncIterator[bytes], max_bytes: int) -> int:
        """Stream an upload to a temporary file, hashing as it comes; renamed into place only
        when the content's sha256 is ``digest``. Returns the size; 400 on a mismatch."""
        final = self.blob_path(digest)
        expected = parse_digest(digest)
        self.blobs.mkdir(parents=True, exist_ok=True)
        sha = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=self.blobs)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise APIError(413, f"the blob is larger than this server's limit of "
                                            f"{max_bytes} bytes", "request_too_large")
                    sha.update(chunk)
                    out.write(chunk)
            if sha.hexdigest() != expected:
                raise APIError(400, f"digest mismatch: the content's digest is sha256:"
                                    f"{sha.hexdigest()}, not {digest}", "digest_mismatch",
                               "digest")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    # -- manifests ---------------------------------------------------------------------------------
    def _manifest_path(self, name: str) -> Path:
        model, tag = check_name(name)
        return self.manifests / model / f"{tag}.json"

    def get(self, name: str) -> Manifest | None:
        try:
            path = self._manifest_path(name)
        except APIError:
            return None
        if not path.is_file():
            return None
        return Manifest(**json.loads(path.read_text()))

    def put(self, manifest: Manifest) -> None:
        path = self._manifest_path(manifest.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(manifest), indent=1))
        os.replace(tmp, path)

    def delete(self, name: str) -> bool:
        path = self._manifest_path(name)
        if not path.is_file():
            return False
        path.unlink()
        if not any(path.parent.iterdir()):
            path.parent.rmdir()
        return True

    def all(self) -> list[Manifest]:
        if not self.manifests.is_dir():
            return []
        found = []
        for path in sorted(self.manifests.glob("*/*.json")):
            found.append(Manifest(**json.loads(path.read_text())))
        return found

    def gguf_file(self, manifest: Manifest) -> Path:
        """The blob as a ``.gguf`` path: loaders recognise GGUF files by their suffix."""
        assert manifest.blob is not None
        blob = self.blob_path(manifest.blob)
        link = self.root / "gguf" / f"{blob.name}.gguf"
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(blob)
            os.replace(tmp, link)
        return link
