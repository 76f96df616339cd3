"""The closed set of errors the API returns, mapped to HTTP in one place.

Every error body is `{"error": {"type", "message"}}`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.registry import AdapterNotFound, InvalidAdapterName, NoActiveBaseModel
from adapters.validation import InvalidAdapter


class ApiError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BadRequest(ApiError):
    status, type = 400, "invalid_request"


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"


class Forbidden(ApiError):
    status, type = 403, "forbidden"


class NotFound(ApiError):
    status, type = 404, "not_found"


class Conflict(ApiError):
    status, type = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, type = 413, "payload_too_large"


class UnprocessableAdapter(ApiError):
    status, type = 422, "invalid_adapter"


class WorkerUnavailable(ApiError):
    """No worker can take the request now; retrying later may succeed."""

    status, type = 503, "worker_unavailable"

    def __init__(self, message: str, *, retry_after: int | None = 2) -> None:
        super().__init__(message, retry_after=retry_after)


class GenerationFailed(ApiError):
    status, type = 500, "generation_failed"


def error_body(kind: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": kind, "message": message}}


def _response(status: int, kind: str, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)


def as_api_error(exc: Exception) -> ApiError:
    """Map the registry's own exceptions onto the API's set."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AdapterNotFound):
        return NotFound(f"adapter {exc.args[0]!r} not found")
    if isinstance(exc, InvalidAdapter):
        return UnprocessableAdapter(str(exc))
    if isinstance(exc, InvalidAdapterName):
        return BadRequest(str(exc))
    if isinstance(exc, NoActiveBaseModel):
        return WorkerUnavailable(str(exc), retry_after=10)
    return ApiError("internal error")


def install_error_handlers(app: FastAPI) -> None:
    mapped = (ApiError, AdapterNotFound, InvalidAdapter, InvalidAdapterName, NoActiveBaseModel)

    async def on_mapped(_: Request, exc: Exception) -> JSONResponse:
        err = as_api_error(exc)
        return _response(err.status, err.type, err.message, err.retry_after)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors()
        )
        return _response(422, "invalid_request", problems or "invalid request")

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return _response(exc.status_code, "http_error", str(exc.detail))

    for cls in mapped:
        app.add_exception_handler(cls, on_mapped)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
