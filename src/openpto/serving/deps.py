"""Dependencies shared by the routers: the app's service object and the API key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from openpto.serving.errors import APIError
from openpto.serving.service import Service


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def require_api_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` when the server has a key; compared in constant time."""
    key = get_service(request).settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                key.encode()):
        raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                       "invalid_api_key")
