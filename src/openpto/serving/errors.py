"""HTTP errors in the two wire formats: OpenAI's and Ollama's.

OpenAI: ``{"error": {"message", "type", "code", "param"}}``; Ollama: ``{"error": "message"}``.
The format follows the route family (``/api/`` is Ollama's), so each client parses its own kind.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openpto import errors as opt_errors

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error with its HTTP status; raised by routes and dependencies."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def error_body(path: str, status: int, message: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    if path.startswith("/api/"):
        return {"error": message}
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(request: Request, status: int, message: str, code: str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, status, message, code, param),
                        status_code=status, headers=headers)


def status_of(exc: opt_errors.OptError) -> int:
    """Errors a request can cause are 4xx; a backend that cannot serve is 503."""
    if isinstance(exc, opt_errors.ModelNotFound):
        return 404
    if isinstance(exc, opt_errors.BackendUnavailable | opt_errors.MissingDependency):
        return 503
    if isinstance(exc, opt_errors.UsageError | opt_errors.DataError | opt_errors.ConfigError):
        return 400
    return 500


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(request, exc.status, exc.message, exc.code, exc.param, headers)


async def _opt_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, opt_errors.OptError)
    return error_response(request, status_of(exc), str(exc), type(exc).__name__)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    # A body that is not JSON, or JSON that is not an object, is malformed rather than invalid.
    if any(p.get("type") == "json_invalid" or tuple(p.get("loc", ())) == ("body",)
           for p in problems):
        return error_response(request, 400, "the request body must be a JSON object",
                              "invalid_json")
    first = problems[0] if problems else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else str(first.get("msg"))
    return error_response(request, 422, message, "invalid_value", where or None)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    return error_response(request, exc.status_code, message)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, 500, f"internal error: {type(exc).__name__}: {exc}")


HANDLERS = {
    APIError: _api_error,
    opt_errors.OptError: _opt_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
    Exception: _unexpected,
}
