"""Several models in one server, as Ollama serves them: loaded on first request, unloaded when
idle for ``keep_alive`` or when ``max_loaded`` / ``memory_budget`` needs the room.

What the server can serve (the catalog) is read afresh on every listing: the model it was started
with, the models created, copied or pulled through the management routes (``ModelStore``), the
aliases, and the artifacts of ``opt models list``. Loaded models are evicted least recently used
first, and never while a request is running on them.

Routes get a ``Loaded`` from ``acquire`` and must take a lease (``lease``) before they next
await; everything here runs on the event loop, so nothing is evicted in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import math
import re
import time
from pathlib import Path
from typing import Any

from openpto.engines.engine import Engine, EngineOptions, EngineStats, make_engine
from openpto.errors import CorruptFile, OptError, UnsupportedModel, UsageError
from openpto.serving.errors import APIError, status_of
from openpto.serving.model_store import Manifest, ModelStore, canonical
from openpto.serving.settings import ServerSettings

FOREVER = math.inf
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                 "h": 3600.0}


def parse_keep_alive(value: float | str | None) -> float | None:
    """Seconds from Ollama's ``keep_alive``: a number of seconds or a Go duration ("5m",
    "1h30m"); negative means forever, 0 unloads once the request ends; None: not given."""
    if value is None:
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)  # "300": seconds, as a number would be
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise APIError(400, f"keep_alive {value!r} is not a duration (e.g. \"5m\", "
                                    "\"30s\", 300, 0, -1)", "invalid_keep_alive",
                               "keep_alive") from None
            seconds = sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    return FOREVER if seconds < 0 else seconds


def parse_bytes(text: str | int | None) -> int | None:
    """``2GB``, ``512MiB``, ``1.5G`` or a plain number of bytes."""
    if text is None or isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size (e.g. 2GB, 512MiB, 1000000)")
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(prefix.upper() or " "))


def pool_settings(keep_alive: str, max_loaded: int, memory_budget: str | None
                  ) -> dict[str, Any]:
    """``ServerSettings`` fields from ``opt serve``'s flags; ``UsageError`` for a bad value."""
    try:
        parse_keep_alive(keep_alive)
        budget = parse_bytes(memory_budget)
    except (APIError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    return {"keep_alive": keep_alive, "max_loaded": max_loaded, "memory_budget": budget}


def iso(timestamp: float) -> str:
    if timestamp == FOREVER:  # what Ollama shows for a model kept forever
        return "2318-11-27T23:24:55Z"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return moment.isoformat().replace("+00:00", "Z")


@dataclasses.dataclass
class CatalogEntry:
    """A model this server can serve, loaded or not."""

    name: str
    source: str  # "preloaded", "created", "alias" or "artifact"
    spec: str | None = None  # the MODEL the engine loads; None for an engine given in memory
    manifest: Manifest | None = None
    path: Path | None = None
    modified: float = dataclasses.field(default_factory=time.time)

    @property
    def key(self) -> str:
        return canonical(self.name)


@dataclasses.dataclass
class Loaded:
    entry: CatalogEntry
    engine: Engine
    rebuildable: bool  # False for the engine the server was started with: it stays loaded
    keep_alive: float
    size_bytes: int
    in_flight: int = 0
    retired: bool = False  # deleted or re-created: serves its running requests, then unloads
    last_used: float = dataclasses.field(default_factory=time.time)
    idle_since: float = dataclasses.field(default_factory=time.time)

    @property
    def backend(self) -> str:
        return self.engine.backend

    @property
    def expires_at(self) -> float:
        if not self.rebuildable:
            return FOREVER
        start = time.time() if self.in_flight else self.idle_since
        return start + self.keep_alive

    @property
    def expired(self) -> bool:
        return self.rebuildable and not self.in_flight and (
            self.retired or self.expires_at <= time.time())


class ModelPool:
    def __init__(self, settings: ServerSettings, store: ModelStore, backend: str,
                 options: EngineOptions) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.options = options
        self.default_keep_alive = parse_keep_alive(settings.keep_alive) or 0.0
        self._given: dict[str, tuple[CatalogEntry, Engine]] = {}
        self._loaded: dict[str, Loaded] = {}
        self._sizes: dict[str, int] = {}  # measured at load, for the next load's room
        self._load_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.primary: str | None = None
        #: given engines whose start-up load has not finished
        self.starting: set[str] = set()

    # -- the catalog -------------------------------------------------------------------------------
    def give(self, name: str, engine: Engine) -> None:
        """Serve ``engine`` (built by the caller, loaded at start-up) under ``name``. It stays
        loaded: it is the model the server was started for, and it could not be rebuilt."""
        entry = CatalogEntry(name, "preloaded", getattr(engine, "spec", None))
        self._given[entry.key] = (entry, engine)
        self.primary = self.primary or entry.key
        if not engine.ready:
            self.starting.add(entry.key)

    def adopt(self, key: str) -> None:
        """The given engine ``key`` finished loading: count it as loaded."""
        entry, engine = self._given[key]
        self.starting.discard(key)
        if entry.spec is None and entry.name in _alias_names():  # the default model, say
            entry.spec = entry.name
        entry.path = entry.path or _source_path(entry.spec)
        self._loaded[key] = Loaded(entry, engine, False, FOREVER, engine.info.size_bytes)

    def catalog(self) -> list[CatalogEntry]:
        entries: dict[str, CatalogEntry] = {k: e for k, (e, _) in self._given.items()}
        for manifest in self.store.all():
            entries.setdefault(manifest.name, self._manifest_entry(manifest))
        if self.settings.serve_local_models:
            for entry in [*_aliases(), *_artifacts()]:
                entries.setdefault(entry.key, entry)
        return list(entries.values())

    def _manifest_entry(self, manifest: Manifest) -> CatalogEntry:
        path = self.store.blob_path(manifest.blob) if manifest.blob else _local_path(manifest.spec)
        return CatalogEntry(manifest.name, "created", manifest.spec, manifest, path,
                            manifest.created_at)

    def find(self, name: str) -> CatalogEntry:
        key = canonical(name)
        if key in self._given:
            return self._given[key][0]
        manifest = self.store.get(name)
        if manifest is not None:
            return self._manifest_entry(manifest)
        for entry in self.catalog():
            if entry.key == key:
                return entry
        names = ", ".join(e.name for e in self.catalog()[:20])
        raise APIError(404, f"model {name!r} is not served here; this server serves: {names}",
                       "model_not_found", "model")

    def backend_for(self, entry: CatalogEntry) -> str:
        """llama.cpp serves GGUF files when it is installed; otherwise the torch backend reads
        them through transformers' GGUF loader. Everything else runs on the server's backend."""
        if entry.key in self._given:
            return self._given[entry.key][1].backend
        if self.spec_of(entry).endswith(".gguf") and (
                self.backend == "llamacpp" or importlib.util.find_spec("llama_cpp")):
            return "llamacpp"
        return "torch" if self.spec_of(entry).endswith(".gguf") else self.backend

    def spec_of(self, entry: CatalogEntry) -> str:
        if entry.manifest is not None and entry.manifest.blob:
            return str(self.store.gguf_file(entry.manifest))
        return entry.spec or ""

    # -- loading -------------------------------------------------------------------------------
    def loaded(self, name: str) -> Loaded | None:
        found = self._loaded.get(canonical(name))
        return None if found is None or found.expired else found

    def loaded_models(self) -> list[Loaded]:
        """What ``/api/ps`` shows: loaded and not past their keep_alive."""
        return [m for m in self._loaded.values() if not m.expired]

    async def acquire(self, name: str, keep_alive: float | str | None = None) -> Loaded:
        """The loaded model ``name`` (loading it first, making room if needed)."""
        seconds = parse_keep_alive(keep_alive)
        key = canonical(name)
        model = self._loaded.get(key)
        if model is None or model.retired:
            async with self._load_lock:
                model = self._loaded.get(key)
                if model is not None and model.retired:
                    await self._wait_idle(model)
                    await self.unload(model, reason="replaced")
                    model = None
                if model is None:
                    model = await self._load(self.find(name))
        model.last_used = time.time()
        if not model.in_flight:
            model.idle_since = model.last_used
        if model.rebuildable:  # each request sets it, as in Ollama; unset means the default
            model.keep_alive = self.default_keep_alive if seconds is None else seconds
        if model.expired:
            self._wake.set()
        return model

    async def _load(self, entry: CatalogEntry) -> Loaded:
        key = entry.key
        if key in self._given:
            _, engine = self._given[key]
            if engine.ready:
                self.adopt(key)
                return self._loaded[key]
            if key in self.starting:
                raise APIError(503, "the model is still loading", "model_loading")
            raise APIError(503, f"model {entry.name!r} did not load at start-up",
                           "model_load_failed")
        engine = make_engine(self.backend_for(entry), self.spec_of(entry), self.options)
        estimate = self._sizes.get(key) or _disk_size(entry.path)
        await self._make_room(key, estimate)
        started = time.perf_counter()
        try:
            await asyncio.to_thread(engine.load)
        except BaseException as exc:
            await asyncio.to_thread(engine.close)
            raise _load_error(entry, engine, exc) from exc
        model = Loaded(entry, engine, True, self.default_keep_alive, engine.info.size_bytes)
        self._loaded[key] = model
        self._sizes[key] = model.size_bytes
        _log({"event": "model_loaded", "model": entry.name, "backend": engine.backend,
              "seconds": round(time.perf_counter() - started, 3), "size_bytes": model.size_bytes})
        await self._enforce_budget(keep=key)
        return model

    async def _make_room(self, key: str, estimate: int) -> None:
        """Unload idle models, least recently used first, until ``key`` fits; while every
        loaded model is busy, wait for one to finish (at most ``load_wait_seconds``)."""
        deadline = time.monotonic() + self.settings.load_wait_seconds
        while True:
            others = [m for k, m in self._loaded.items() if k != key]
            fits_count = not self.settings.max_loaded or len(others) < self.settings.max_loaded
            budget = self.settings.memory_budget
            fits_memory = (not budget or not others
                           or sum(m.size_bytes for m in others) + estimate <= budget)
            if fits_count and fits_memory:
                return
            victim = self._least_recently_used(exclude=key)
            if victim is not None:
                await self.unload(victim, reason="room")
                continue
            if not any(m.rebuildable for m in others):  # waiting would free nothing
                raise APIError(503, f"no room to load {key}: the model this server was started "
                                    "with takes all of --max-loaded / --memory-budget", "no_room")
            if time.monotonic() > deadline:
                raise APIError(503, f"no room to load {key}: every loaded model is busy "
                                    "(see --max-loaded / --memory-budget)", "no_room")
            await asyncio.sleep(0.05)

    async def _wait_idle(self, model: Loaded) -> None:
        deadline = time.monotonic() + self.settings.load_wait_seconds
        while model.in_flight:
            if time.monotonic() > deadline:
                raise APIError(503, f"{model.entry.name} is being replaced and still busy",
                               "model_busy")
            await asyncio.sleep(0.05)

    async def _enforce_budget(self, keep: str) -> None:
        budget = self.settings.memory_budget
        while budget and sum(m.size_bytes for m in self._loaded.values()) > budget:
            victim = self._least_recently_used(exclude=keep)
            if victim is None:
                return
            await self.unload(victim, reason="memory budget")

    def _least_recently_used(self, exclude: str) -> Loaded | None:
        idle = [m for k, m in self._loaded.items()
                if k != exclude and not m.in_flight and m.rebuildable]
        return min(idle, key=lambda m: m.last_used, default=None)

    async def unload(self, model: Loaded, reason: str) -> None:
        key = model.entry.key
        if self._loaded.get(key) is not model:
            return
        del self._loaded[key]
        await asyncio.to_thread(_close, model.engine)
        _log({"event": "model_unloaded", "model": model.entry.name, "reason": reason})

    # -- leases --------------------------------------------------------------------------------
    def lease(self, model: Loaded) -> None:
        model.in_flight += 1
        model.last_used = time.time()

    def release(self, model: Loaded) -> None:
        """On the event loop (engine threads hand it over with ``call_soon_threadsafe``)."""
        model.in_flight = max(0, model.in_flight - 1)
        if not model.in_flight:
            model.idle_since = time.time()
            if model.expired:
                self._wake.set()

    async def sweep_forever(self, interval: float = 1.0) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            for model in [m for m in self._loaded.values() if m.expired]:
                await self.unload(model, reason="keep_alive")

    async def forget(self, name: str) -> None:
        """The model was deleted or re-created: unload it now if idle, else once its running
        requests end; a new request loads what the name names now."""
        model = self._loaded.get(canonical(name))
        if model is not None and model.rebuildable:
            model.retired = True
            if not model.in_flight:
                await self.unload(model, reason="deleted")
            else:
                self._wake.set()

    def stats(self) -> EngineStats:
        total = EngineStats()
        for model in list(self._loaded.values()):
            s = model.engine.stats()
            total.running += s.running
            total.waiting += s.waiting
            total.draft_tokens += s.draft_tokens
            total.accepted_tokens += s.accepted_tokens
        return total

    def close(self) -> None:
        for model in list(self._loaded.values()):
            _close(model.engine)
        self._loaded.clear()


def _close(engine: Engine) -> None:
    engine.close()
    # The engine's weights are freed only once nothing refers to them.
    gc.collect()


def _load_error(entry: CatalogEntry, engine: Engine, exc: BaseException) -> Exception:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, CorruptFile | UnsupportedModel) and engine.backend == "torch" and \
            str(getattr(engine, "spec", "")).endswith(".gguf"):
        return APIError(400, f"model {entry.name!r}: {exc}; the torch backend reads GGUF files "
                             "through transformers, the llama.cpp backend reads more of them: "
                             "pip install 'openpto[llamacpp]'", type(exc).__name__)
    if isinstance(exc, CorruptFile):
        return APIError(400, f"model {entry.name!r}: {exc}", "CorruptFile")
    if isinstance(exc, OptError):
        return APIError(status_of(exc), f"model {entry.name!r}: {exc}", type(exc).__name__)
    if isinstance(exc, Exception):
        return APIError(500, f"model {entry.name!r} did not load: {type(exc).__name__}: {exc}",
                        "load_failed")
    raise exc


def _log(record: dict[str, Any]) -> None:
    from openpto.serving.middleware import stderr_json

    stderr_json(record)


def _disk_size(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _local_path(spec: str | None) -> Path | None:
    if not spec:
        return None
    path = Path(spec).expanduser()
    return path if path.exists() else None


def _alias_names() -> list[str]:
    from openpto.models.aliases import alias_names

    return alias_names()


def _source_path(spec: str | None) -> Path | None:
    """The file or folder a MODEL spec loads from (a GGUF file for an alias), if any."""
    if not spec:
        return None
    from openpto.models import resolve_model

    try:
        return resolve_model(spec).path
    except OptError:
        return None


def _aliases() -> list[CatalogEntry]:
    from openpto.models.aliases import ALIASES

    found = []
    for name, alias in sorted(ALIASES.items()):
        try:
            path = alias.locate()
        except OptError:  # the package that carries it is not installed: not servable here
            continue
        found.append(CatalogEntry(name, "alias", name, path=path, modified=path.stat().st_mtime))
    return found


def _artifacts() -> list[CatalogEntry]:
    from openpto.store import Store

    found = []
    for row in Store().rows("models"):
        path = Path(str(row.get("path") or ""))
        if row.get("id") and path.is_dir():
            found.append(CatalogEntry(str(row["id"]), "artifact", str(path), path=path,
                                      modified=path.stat().st_mtime))
    return found
