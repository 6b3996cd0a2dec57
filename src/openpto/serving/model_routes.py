"""Ollama's model management: blobs, create, copy, delete, pull (local only), tags, show, ps.

What the official ``ollama`` client sends: ``create_blob`` POSTs the file to
``/api/blobs/sha256:<hex>``; ``create`` names uploaded blobs in ``files`` or a model in ``from``,
with template, system, parameters, license and messages; ``pull`` here finds a model that is
already on this machine (an alias, an artifact, a ``.gguf`` file or folder) and never downloads.
Created models live in the server's ``ModelStore`` and are served like any other model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import Field, ValidationError

from openpto.errors import CorruptFile, ModelNotFound, OptError
from openpto.serving.deps import ServiceDep, require_api_key
from openpto.serving.errors import APIError, status_of
from openpto.serving.model_store import Manifest, ModelStore, canonical, check_name
from openpto.serving.pool import CatalogEntry, Loaded, ModelPool, iso
from openpto.serving.schemas import OllamaOptions, OllamaShowRequest, _Lenient
from openpto.serving.service import Service

router = APIRouter(prefix="/api", dependencies=[Depends(require_api_key)], tags=["ollama"])


class CreateRequest(_Lenient):
    model: str = Field(..., min_length=1, max_length=512)
    from_: str | None = Field(None, alias="from", max_length=4096)
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    quantize: str | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = Field(None, max_length=1024)
    stream: bool = True


class CopyRequest(_Lenient):
    source: str = Field(..., min_length=1, max_length=512)
    destination: str = Field(..., min_length=1, max_length=512)


class DeleteRequest(_Lenient):
    model: str | None = Field(None, max_length=512)
    name: str | None = Field(None, max_length=512)


class PullRequest(_Lenient):
    model: str | None = Field(None, max_length=4096)
    name: str | None = Field(None, max_length=4096)
    insecure: bool = False
    stream: bool = True


def _pool(service: Service) -> ModelPool:
    assert service.pool is not None
    return service.pool


def _store(service: Service) -> ModelStore:
    return _pool(service).store


def _progress(statuses: Iterable[dict[str, Any]], streaming: bool) -> Any:
    """Ollama's progress: NDJSON status lines ending in ``success``, or only the last one."""
    lines = [*statuses, {"status": "success"}]
    if not streaming:
        return lines[-1]
    return StreamingResponse((json.dumps(line) + "\n" for line in lines),
                             media_type="application/x-ndjson")


# -- blobs -----------------------------------------------------------------------------------------


@router.head("/blobs/{digest}")
async def blob_exists(digest: str, service: ServiceDep) -> Response:
    return Response(status_code=200 if _store(service).has_blob(digest) else 404)


@router.post("/blobs/{digest}", status_code=201)
async def upload_blob(digest: str, request: Request, service: ServiceDep) -> Response:
    store = _store(service)
    await store.write_blob(digest, request.stream(), service.settings.max_blob_bytes)
    return Response(status_code=201)


# -- create, copy, delete, pull ------------------------------------------------------------------


@router.post("/create")
async def create(body: CreateRequest, service: ServiceDep) -> Any:
    name = canonical(body.model)
    check_name(name)
    _not_the_servers_own(service, name)
    if body.parameters:
        try:
            OllamaOptions.model_validate(body.parameters)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise APIError(400, f"parameters.{where}: {problem['msg']}", "invalid_value",
                           "parameters") from None
    if body.quantize:
        raise APIError(400, "quantize is not supported here; quantize with opt quantize and "
                            "create from the artifact", "unsupported_parameter", "quantize")
    if body.adapters:
        raise APIError(400, "adapters are not supported", "unsupported_parameter", "adapters")
    store = _store(service)
    statuses: list[dict[str, Any]] = []
    if body.files:
        base = await _from_files(store, name, body.files, statuses)
    elif body.from_:
        base = _from_model(_pool(service), name, body.from_)
        statuses.append({"status": f"using model {body.from_}"})
    else:
        raise APIError(400, "create needs files (an uploaded GGUF blob) or from (a model)",
                       "invalid_request", "files")
    license_text = "\n".join(body.license) if isinstance(body.license, list) else body.license
    manifest = dataclasses.replace(
        base,
        template=base.template if body.template is None else body.template,
        system=base.system if body.system is None else body.system,
        parameters={**base.parameters, **(body.parameters or {})},
        license=base.license if license_text is None else license_text,
        messages=base.messages if body.messages is None else list(body.messages),
    )
    for field in ("template", "system", "parameters", "license", "messages"):
        if getattr(body, field):
            statuses.append({"status": f"creating {field} layer"})
    statuses.append({"status": "writing manifest"})
    store.put(manifest)
    await _pool(service).forget(name)  # a model re-created under a loaded name reloads
    return _progress(statuses, body.stream)


async def _from_files(store: ModelStore, name: str, files: dict[str, str],
                      statuses: list[dict[str, Any]]) -> Manifest:
    ggufs = {f: d for f, d in files.items() if f.lower().endswith(".gguf")}
    if len(ggufs) != 1 or len(files) != 1:
        raise APIError(400, "files must name exactly one .gguf file (safetensors folders: "
                            "create with from, an artifact path)", "unsupported_files", "files")
    (filename, digest), = ggufs.items()
    if "/" in filename or "\\" in filename or ".." in filename:
        raise APIError(400, f"file name {filename!r}: names are not paths", None, "files")
    if not store.has_blob(digest):
        raise APIError(400, f"blob {digest} not found: upload it first (POST /api/blobs/"
                            f"{digest})", "blob_not_found", "files")
    statuses.append({"status": "parsing GGUF"})
    from openpto.models.gguf import gguf_architecture

    try:
        await asyncio.to_thread(gguf_architecture, store.blob_path(digest))
    except CorruptFile as exc:
        message = str(exc).replace(str(store.blob_path(digest)), filename)
        raise APIError(400, message, "corrupt_gguf", "files") from exc
    statuses.append({"status": f"using existing layer {digest}", "digest": digest})
    return Manifest(name=name, blob=digest)


def _from_model(pool: ModelPool, name: str, source: str) -> Manifest:
    """A new manifest over what ``source`` names: a served model (its settings are kept) or a
    local MODEL (alias, artifact folder, ``.gguf`` file)."""
    try:
        entry: CatalogEntry | None = pool.find(source)
    except APIError:
        entry = None
    if entry is not None:
        if entry.manifest is not None:
            return dataclasses.replace(entry.manifest, name=name)
        if entry.spec is not None:
            return Manifest(name=name, spec=entry.spec)
        try:  # the server's own model, given without a spec: the default alias, say
            return Manifest(name=name, spec=_local_spec(source))
        except APIError:
            raise APIError(400, f"{source!r} is a model held in memory; create from its "
                                "files", "invalid_request", "from") from None
    return Manifest(name=name, spec=_local_spec(source))


def _local_spec(source: str) -> str:
    from openpto.models import resolve_model

    try:
        found = resolve_model(source)
    except ModelNotFound as exc:
        raise APIError(404, f"model {source!r} not found on this machine: {exc}",
                       "model_not_found", "model") from exc
    except OptError as exc:
        raise APIError(status_of(exc), str(exc), type(exc).__name__, "model") from exc
    return source if found.kind in ("alias", "hub-cache") else str(found.path.resolve())


@router.post("/copy")
async def copy(body: CopyRequest, service: ServiceDep) -> Response:
    destination = canonical(body.destination)
    check_name(destination)
    _not_the_servers_own(service, destination)
    _pool(service).find(body.source)  # 404 for a name that is not served here
    manifest = _from_model(_pool(service), destination, body.source)
    _store(service).put(manifest)
    await _pool(service).forget(destination)
    return Response(status_code=200)


def _not_the_servers_own(service: Service, name: str) -> None:
    if canonical(name) == _pool(service).primary:
        raise APIError(400, f"{name!r} is the model this server was started with; choose "
                            "another name", "name_taken", "model")


@router.post("/push")
async def push(service: ServiceDep) -> Any:
    raise APIError(400, "this server keeps models on this machine and pushes to no registry",
                   "unsupported", "model")


@router.delete("/delete")
async def delete(body: DeleteRequest, service: ServiceDep) -> Response:
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required", None, "model")
    check_name(name)
    if not _store(service).delete(name):
        try:
            entry = _pool(service).find(name)
        except APIError:
            raise APIError(404, f"model {name!r} not found", "model_not_found",
                           "model") from None
        raise APIError(400, f"{name!r} is {'an' if entry.source[0] in 'aeiou' else 'a'} "
                            f"{entry.source} model, not one created here; only created models "
                            "are deleted", "not_deletable", "model")
    await _pool(service).forget(name)
    return Response(status_code=200)


@router.post("/pull")
async def pull(body: PullRequest, service: ServiceDep) -> Any:
    """A model that is already here: a served name, or a local path (registered under its
    file or folder name). Nothing is downloaded."""
    source = body.model or body.name
    if not source:
        raise APIError(400, "model is required", None, "model")
    pool = _pool(service)
    statuses: list[dict[str, Any]] = [{"status": "pulling manifest"}]
    try:
        entry = pool.find(source)
    except APIError:
        entry = None
    if entry is None:
        if not Path(source).expanduser().exists():
            raise APIError(404, f"model {source!r} is not on this machine; this server pulls "
                                "nothing from the network (give an alias, a name from "
                                "/api/tags or a local artifact / .gguf path)",
                           "model_not_found", "model")
        spec = _local_spec(source)
        from openpto.engines.engine import served_name

        name = canonical(served_name(spec))
        check_name(name)
        size = _size(Path(spec))
        digest = f"sha256:{Manifest(name=name, spec=spec).digest}"
        statuses += [{"status": f"pulling {digest[7:19]}", "digest": digest, "total": size,
                      "completed": size},
                     {"status": "verifying sha256 digest"}, {"status": "writing manifest"}]
        pool.store.put(Manifest(name=name, spec=spec))
    return _progress(statuses, body.stream)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- listing: tags, show, ps -----------------------------------------------------------------------


def human_number(count: int) -> str:
    """A parameter count as Ollama writes it (``format.HumanNumber``): 135M, 1.5B, 7.24B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            number = count / scale
            places = 0 if number >= 100 else 1 if number >= 10 else 2
            text = f"{number:.{places}f}"
            if "." in text:
                text = text.rstrip("0").rstrip(".")
            return text + unit
    return str(count)


@functools.lru_cache(maxsize=64)
def _gguf_facts(path: str, mtime: float) -> tuple[str, int, str]:
    """(architecture, parameter count, file type) of a GGUF file from its header; Ollama counts
    the elements of every tensor in the file (a tied embedding once)."""
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields.get("general.architecture")
    architecture = str(field.contents()) if field is not None else "unknown"
    count = sum(int(t.n_elements) for t in reader.tensors)
    file_type = reader.fields.get("general.file_type")
    level = ""
    if file_type is not None:
        try:
            level = gguf.LlamaFileType(int(file_type.contents())).name.removeprefix("MOSTLY_")
        except ValueError:
            level = str(file_type.contents())
    return architecture, count, level


def _gguf_path(pool: ModelPool, entry: CatalogEntry) -> Path | None:
    spec = pool.spec_of(entry) if entry.manifest is not None else ""
    if spec.endswith(".gguf"):
        return Path(spec)
    if entry.path is not None and entry.path.suffix == ".gguf":
        return entry.path
    return None


def details(pool: ModelPool, entry: CatalogEntry, loaded: Loaded | None) -> dict[str, Any]:
    backend = loaded.backend if loaded is not None else pool.backend_for(entry)
    result: dict[str, Any] = {"parent_model": "", "format": "", "family": "", "families": [],
                              "parameter_size": "", "quantization_level": "", "backend": backend}
    gguf_file = _gguf_path(pool, entry)
    if loaded is not None:
        info = loaded.engine.info
        result.update(format=info.format, family=info.family, families=[info.family],
                      parameter_size=human_number(info.parameter_count) if info.parameter_count
                      else "", quantization_level=info.quantization)
    if gguf_file is not None and gguf_file.is_file():
        architecture, count, level = _gguf_facts(str(gguf_file), gguf_file.stat().st_mtime)
        result.update(format="gguf", family=result["family"] or architecture,
                      families=[result["family"] or architecture],
                      parameter_size=human_number(count),
                      quantization_level=level or result["quantization_level"])
    elif loaded is None and entry.path is not None and (entry.path / "config.json").is_file():
        config = json.loads((entry.path / "config.json").read_text())
        family = str(config.get("model_type", ""))
        result.update(format="artifact" if entry.source == "artifact" else "safetensors",
                      family=family, families=[family] if family else [])
    return result


def _digest(entry: CatalogEntry, loaded: Loaded | None) -> str:
    if entry.manifest is not None:
        return entry.manifest.digest
    if loaded is not None:
        return loaded.engine.info.digest
    return Manifest(name=entry.key, spec=entry.spec or entry.name).digest


def _disk_size(entry: CatalogEntry, loaded: Loaded | None) -> int:
    if entry.path is not None and entry.path.exists():
        return _size(entry.path)
    return loaded.size_bytes if loaded is not None else 0


@router.get("/tags")
async def tags(service: ServiceDep) -> Any:
    pool = _pool(service)
    models = []
    for entry in pool.catalog():
        loaded = pool.loaded(entry.name)
        models.append({"name": entry.name, "model": entry.name,
                       "modified_at": iso(entry.modified), "size": _disk_size(entry, loaded),
                       "digest": _digest(entry, loaded), "details": details(pool, entry, loaded)})
    return {"models": models}


def parameters_text(parameters: dict[str, Any]) -> str:
    """Ollama's ``parameters`` text: one ``name value`` line per value, strings quoted."""
    lines = []
    for name, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            text = json.dumps(item) if isinstance(item, str) else json.dumps(item).lower()
            lines.append(f"{name:<30} {text}")
    return "\n".join(lines)


@router.post("/show")
async def show(body: OllamaShowRequest, service: ServiceDep) -> Any:
    name = body.model or body.name
    if not name:
        raise APIError(400, "model is required")
    bound = await service.use(name)
    assert bound.model is not None
    pool, entry, info = _pool(service), bound.model.entry, bound.engine.info
    manifest = entry.manifest or Manifest(name=entry.key)
    modelfile = [f"# served by openpto ({info.backend} backend)", f"FROM {info.path}"]
    if manifest.template:
        modelfile.append(f'TEMPLATE """{manifest.template}"""')
    if manifest.system:
        modelfile.append(f'SYSTEM """{manifest.system}"""')
    modelfile += [f"PARAMETER {line}" for line in parameters_text(manifest.parameters).splitlines()]
    if manifest.license:
        modelfile.append(f'LICENSE """{manifest.license}"""')
    facts = details(pool, entry, bound.model)
    gguf_file = _gguf_path(pool, entry)
    count = (_gguf_facts(str(gguf_file), gguf_file.stat().st_mtime)[1]
             if gguf_file is not None and gguf_file.is_file() else info.parameter_count)
    return {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": parameters_text(manifest.parameters),
        "template": manifest.template or info.chat_template,
        "system": manifest.system,
        "license": manifest.license,
        "messages": manifest.messages,
        "details": facts,
        "model_info": {
            "general.architecture": info.family,
            "general.parameter_count": count,
            f"{info.family}.context_length": info.context_length,
            f"{info.family}.embedding_length": info.embedding_length,
        },
        "capabilities": ["completion", "embedding", "tools"],
        "modified_at": iso(entry.modified),
    }


@router.get("/ps")
async def ps(service: ServiceDep) -> Any:
    pool = _pool(service)
    models = []
    for loaded in pool.loaded_models():
        info = loaded.engine.info
        device = str(getattr(getattr(loaded.engine, "options", None), "device", "cpu"))
        models.append({"name": loaded.entry.name, "model": loaded.entry.name,
                       "size": loaded.size_bytes, "digest": _digest(loaded.entry, loaded),
                       "details": details(pool, loaded.entry, loaded),
                       "expires_at": iso(loaded.expires_at),
                       "size_vram": 0 if device == "cpu" else loaded.size_bytes,
                       "context_length": info.context_length})
    return {"models": models}
