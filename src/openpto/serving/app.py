"""``create_app(settings, engine)``: the FastAPI application; ``serve(...)`` runs it under uvicorn.

No module-level state: everything an app needs hangs off ``app.state.service``, so tests can run
several apps (different settings, different engines) in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from openpto import __version__
from openpto.engines.engine import Engine, EngineOptions, make_engine
from openpto.errors import OptError
from openpto.serving import model_routes, ollama_routes, openai_routes, ops_routes
from openpto.serving.errors import HANDLERS
from openpto.serving.json_body import JSONBodies
from openpto.serving.metrics import ServerMetrics
from openpto.serving.middleware import AccessLog, BodyLimit, LogSink, stderr_json
from openpto.serving.model_store import ModelStore
from openpto.serving.pool import ModelPool
from openpto.serving.service import Service
from openpto.serving.settings import ServerSettings


def create_app(settings: ServerSettings, engine: Engine,
               access_sink: LogSink | None = stderr_json, *,
               backend: str | None = None, options: EngineOptions | None = None) -> FastAPI:
    """The app serving ``engine`` first and, on demand, every other model the server can serve
    (``ModelPool``). ``engine`` loads in the background at start-up: ``/health`` answers 503
    until it is ready, and its routes answer 503 meanwhile. Other models load on the backend
    ``backend`` (default: ``engine``'s) with ``options``. ``engine`` itself stays loaded for
    the app's life: it is the model the server was started to serve."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service: Service = app.state.service
        loading = asyncio.create_task(_load(service, pool))
        sweeping = asyncio.create_task(pool.sweep_forever())
        try:
            yield
        finally:
            loading.cancel()
            sweeping.cancel()
            await asyncio.to_thread(pool.close)
            await asyncio.to_thread(engine.close)
            service.close()

    from openpto.store.db import opt_home

    model_id = settings.model_id or engine.info.id
    engine_options = options or getattr(engine, "options", None) or EngineOptions()
    store = ModelStore(settings.models_dir or opt_home() / "ollama")
    pool = ModelPool(settings, store, backend or engine.backend, engine_options)
    pool.give(model_id, engine)
    metrics = ServerMetrics(model_id, pool.stats, lambda: engine.ready)
    # With an API key, every route but /health needs it: the generated docs are left out rather
    # than served unauthenticated.
    docs = {} if settings.api_key is None else {"docs_url": None, "redoc_url": None,
                                                "openapi_url": None}
    app = FastAPI(title="openpto", version=__version__, lifespan=lifespan,
                  exception_handlers=HANDLERS, **docs)  # type: ignore[arg-type]
    app.state.service = Service(settings, engine, metrics, pool)
    app.include_router(ops_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(ollama_routes.router)
    app.include_router(model_routes.router)
    # Added innermost first: access log (outermost) -> CORS -> size limit -> JSON bodies -> routes.
    app.add_middleware(JSONBodies, raw_prefixes=(BLOBS,))
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes,
                       streamed_prefixes=(BLOBS,))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AccessLog, sink=access_sink if settings.access_log else None,
                       on_done=metrics.observe_http)
    return app


BLOBS = "/api/blobs/"  # uploads stream to disk with their own limit (max_blob_bytes)


async def _load(service: Service, pool: ModelPool) -> None:
    started = time.perf_counter()
    key = pool.primary
    try:
        await asyncio.to_thread(service.engine.load)
    except OptError as exc:
        service.load_error = str(exc)
    except Exception as exc:  # reported by /health; the server stays up to say so
        service.load_error = f"{type(exc).__name__}: {exc}"
    service.load_seconds = time.perf_counter() - started
    if key is not None:
        if service.engine.ready:
            pool.adopt(key)
        else:
            pool.starting.discard(key)
    stderr_json({"event": "model_loaded" if service.engine.ready else "model_load_failed",
                 "model": service.model_id, "backend": service.engine.backend,
                 "seconds": round(service.load_seconds, 3), "error": service.load_error})


def serve(settings: ServerSettings, engine: Engine,
          on_started: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run the app under uvicorn until interrupted (blocking)."""
    _run_uvicorn(create_app(settings, engine), settings, engine, on_started)


def _run_uvicorn(app: FastAPI, settings: ServerSettings, engine: Engine,
                 on_started: Callable[[dict[str, Any]], None] | None) -> None:
    import uvicorn

    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if on_started is not None:
        on_started({"url": f"http://{settings.host}:{settings.port}", "model": app.state.service
                    .model_id, "backend": engine.backend})
    # Ctrl-C is how a server is stopped: uvicorn has already shut down gracefully when it
    # re-raises the signal, which is not a failure of the run.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()


def serve_model(
    model: str | None,
    backend: str,
    settings: ServerSettings,
    options: EngineOptions,
    on_started: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """``opt serve``: build the backend's engine, serve until interrupted, record the run.

    The run (kind ``serve``) holds the settings (the API key left out) and, at shutdown, how
    many requests finished and how many tokens they generated.
    """
    from openpto.pipeline.generate import resolve_draft
    from openpto.store import RunRecorder, Store

    engine_config = {k: v for k, v in dataclasses.asdict(options).items() if k != "resolve_draft"}
    config = {"backend": backend, **settings.model_dump(mode="json", exclude={"api_key"}),
              "auth": settings.api_key is not None, **engine_config}
    if options.draft and options.resolve_draft is None:
        options = dataclasses.replace(options, resolve_draft=resolve_draft)
    with RunRecorder(Store(), "serve", model, config) as run:
        from openpto.models import resolve_model

        resolve_model(model)  # a wrong MODEL fails here, not later in /health
        engine = make_engine(backend, model, options)
        app = create_app(settings, engine, backend=backend, options=options)
        service: Service = app.state.service

        def started(info: dict[str, Any]) -> None:
            if on_started is not None:
                on_started({**info, "run_id": run.id})

        _run_uvicorn(app, settings, engine, started)
        totals = service.metrics.totals()
        for name, value in totals.items():
            run.metric(name, value, unit="count", details={"source": "server counters"})
        return {**totals, "run_id": run.id}
