"""Operations: ``/health`` (no key needed) and ``/metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from openpto.serving.deps import ServiceDep, require_api_key
from openpto.serving.metrics import CONTENT_TYPE

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health(service: ServiceDep) -> Any:
    """200 once the model is loaded; 503 while it loads or if loading failed."""
    engine = service.engine
    body = {"status": "ok" if engine.ready else ("failed" if service.load_error else "loading"),
            "model": service.model_id, "backend": engine.backend}
    if service.load_error:
        body["error"] = service.load_error
    return JSONResponse(body, status_code=200 if engine.ready else 503)


@router.get("/metrics", dependencies=[Depends(require_api_key)])
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type=CONTENT_TYPE)
