"""The closed set of errors the API returns, mapped to HTTP in one place.

Every error body is `{"error": {"type", "message"}}`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.jobs import InvalidJob, JobConflict, JobNotFound
from adapters.registry import AdapterNotFound, InvalidAdapterName, NoActiveBaseModel, StorageQuotaExceeded
from adapters.validation import InvalidAdapter

log = logging.getLogger(__name__)


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


class TooManyRequests(ApiError):
    status, type = 429, "rate_limited"


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
    # A message may quote the client's input, lone surrogates included: keep it encodable.
    return {"error": {"type": kind, "message": message.encode("utf-8", "replace").decode("utf-8")}}


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
    if isinstance(exc, StorageQuotaExceeded):
        return TooManyRequests(str(exc), retry_after=60)
    if isinstance(exc, NoActiveBaseModel):
        return WorkerUnavailable(str(exc), retry_after=10)
    if isinstance(exc, InvalidJob):
        return BadRequest(str(exc))
    if isinstance(exc, JobNotFound):
        return NotFound(f"{exc.args[0]} not found")
    if isinstance(exc, JobConflict):
        return Conflict(str(exc))
    return ApiError("internal error")


# Starlette's own errors (unknown path, wrong method) in the same vocabulary as ours.
_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    mapped = (ApiError, AdapterNotFound, InvalidAdapter, InvalidAdapterName, NoActiveBaseModel, StorageQuotaExceeded,
              InvalidJob, JobNotFound, JobConflict)

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
        kind = _HTTP_TYPES.get(exc.status_code, "http_error")
        return _response(exc.status_code, kind, str(exc.detail))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged here with its traceback; the client gets the usual JSON shape and nothing internal.
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _response(500, "internal_error", "internal error")

    for cls in mapped:
        app.add_exception_handler(cls, on_mapped)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
