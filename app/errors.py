"""The closed set of errors the API returns, mapped to HTTP in one place.

Every error body is `{"error": {"type", "message"}}`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.bases import NoActiveBaseModel
from adapters.finetuning import FileNotFound, FileQuotaExceeded, FineTuneQuotaExceeded, InvalidFineTuneRequest
from adapters.jobs import InvalidJob, JobConflict, JobNotFound
from adapters.registry import (
    AdapterNotFound,
    AdapterVersionDeleted,
    InvalidAdapterName,
    StorageQuotaExceeded,
)
from adapters.validation import InvalidAdapter
from worker.finetune_spec import InvalidFineTune
from worker.training_data import TrainingDataError

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


class QuotaStoreUnavailable(ApiError):
    """The shared quota counters (Redis) cannot be reached: limits cannot be checked, so nothing is admitted."""

    status, type = 503, "quota_store_unavailable"

    def __init__(self, message: str, *, retry_after: int | None = 2) -> None:
        super().__init__(message, retry_after=retry_after)


class GenerationFailed(ApiError):
    status, type = 500, "generation_failed"


def worker_error(status: int | None, message: str, request_id: str, worker: str) -> ApiError:
    """A worker's refusal or failure as the client sees it: the request's own problems (400, 422)
    verbatim; the worker's (5xx) as a request id to quote, the detail (torch errors, paths,
    storage errors) only in the log."""
    if status == 400:
        return BadRequest(message)
    if status == 422:
        return UnprocessableAdapter(message)
    log.error("request %s failed on worker %s (%s): %s", request_id, worker, status, message)
    if status == 503:
        return WorkerUnavailable(f"no worker could take the request now (request id {request_id}); retry")
    return GenerationFailed(f"generation failed (request id {request_id}); the service's logs have the detail")


def error_body(kind: str, message: str) -> dict[str, dict[str, str]]:
    # A message may quote the client's input, lone surrogates included: keep it encodable.
    return {"error": {"type": kind, "message": message.encode("utf-8", "replace").decode("utf-8")}}


def _response(status: int, kind: str, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(kind, message), status_code=status, headers=headers)


# The registry's and job store's own exceptions, in the API's vocabulary (first match wins).
_MAPPED: list[tuple[type[Exception], Callable[[Exception], ApiError]]] = [
    (AdapterVersionDeleted, lambda e: NotFound(f"adapter {e.args[0]!r} was deleted; a deleted version's "
                                               "number is never given to other weights")),
    (AdapterNotFound, lambda e: NotFound(f"adapter {e.args[0]!r} not found")),
    (InvalidAdapter, lambda e: UnprocessableAdapter(str(e))),
    (InvalidAdapterName, lambda e: BadRequest(str(e))),
    (StorageQuotaExceeded, lambda e: TooManyRequests(str(e), retry_after=60)),
    (NoActiveBaseModel, lambda e: WorkerUnavailable(str(e), retry_after=10)),
    (InvalidJob, lambda e: BadRequest(str(e))),
    (JobNotFound, lambda e: NotFound(f"{e.args[0]} not found")),
    (JobConflict, lambda e: Conflict(str(e))),
    (FileNotFound, lambda e: NotFound(str(e))),
    (TrainingDataError, lambda e: BadRequest(str(e))),
    (InvalidFineTune, lambda e: BadRequest(str(e))),
    (InvalidFineTuneRequest, lambda e: BadRequest(str(e))),
    (FileQuotaExceeded, lambda e: TooManyRequests(str(e), retry_after=60)),
    (FineTuneQuotaExceeded, lambda e: TooManyRequests(str(e), retry_after=getattr(e, "retry_after", 60))),
]


def as_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    for cls, to_api in _MAPPED:
        if isinstance(exc, cls):
            return to_api(exc)
    return ApiError("internal error")


# Starlette's own errors (unknown path, wrong method) in the same vocabulary as ours.
_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _problem(error: dict[str, Any]) -> str:
    if error.get("type") == "json_invalid":
        return f"the body is not valid JSON: {error.get('ctx', {}).get('error', 'malformed')}"
    return f"{'.'.join(str(p) for p in error['loc'] if p != 'body')}: {error['msg']}"


def install_error_handlers(app: FastAPI) -> None:
    mapped: list[type[Exception]] = [ApiError, *(cls for cls, _ in _MAPPED)]

    async def on_mapped(_: Request, exc: Exception) -> JSONResponse:
        err = as_api_error(exc)
        return _response(err.status, err.type, err.message, err.retry_after)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(_problem(e) for e in exc.errors())
        return _response(422, "invalid_request", problems or "invalid request")

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = _HTTP_TYPES.get(exc.status_code, "http_error")
        return _response(exc.status_code, kind, str(exc.detail))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged here with its traceback; the client gets the usual JSON shape and nothing internal.
        request_id = uuid.uuid4().hex
        log.error("request %s: unhandled error on %s %s", request_id, request.method, request.url.path, exc_info=exc)
        return _response(500, "internal_error", f"internal error (request id {request_id}); the service's logs "
                         "have the detail")

    for cls in mapped:
        app.add_exception_handler(cls, on_mapped)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
