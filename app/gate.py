"""The gateway's outermost gate: who is asking, and how much they may send, before a byte is read.

A request without a valid key is refused unread (FastAPI parses a body before a route's
dependencies run, so the check cannot wait for them). A body is held to its route's limit:
adapter uploads may be large, everything else is a small JSON body. A declared Content-Length
over the limit is refused unread; a chunked body is counted as it arrives and refused the
moment it passes the limit, whatever the app was doing with it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.models import Tenant
from app.errors import error_body

# Multipart framing (boundaries, part headers, the name field) around the files themselves.
FRAMING_SLACK = 1024 * 1024

# Routes anyone may call: probes, the scrape endpoints and the API's own description.
PUBLIC_PATHS = frozenset({"/health/live", "/health/ready", "/metrics", "/metrics/workers", "/docs",
                          "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# The scrape endpoints name tenants and their usage: with a metrics token set, only its bearer reads them.
METRICS_PATHS = frozenset({"/metrics", "/metrics/workers"})


@dataclass(frozen=True)
class Principal:
    """Who a request's key belongs to: the admin, or a tenant."""

    admin: bool
    tenant: Tenant | None = None


class Refusal(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


# Key → who holds it; raises Refusal for a key that is unknown, revoked or suspended.
Authenticator = Callable[[str], Awaitable[Principal]]


@dataclass(frozen=True)
class BodyLimits:
    upload_bytes: int  # POST /adapters (max_adapter_bytes)
    request_bytes: int  # every other body (max_request_bytes)
    file_bytes: int = 64 * 2**20  # POST /v1/files (max_training_file_bytes)

    def for_request(self, method: str, path: str) -> tuple[int, str]:
        if method == "POST" and path.rstrip("/") == "/adapters":
            return self.upload_bytes + FRAMING_SLACK, f"{self.upload_bytes}-byte limit (max_adapter_bytes)"
        if method == "POST" and path.rstrip("/") == "/v1/files":
            return self.file_bytes + FRAMING_SLACK, f"{self.file_bytes}-byte limit (max_training_file_bytes)"
        return self.request_bytes, f"{self.request_bytes}-byte limit (max_request_bytes)"


class RequestGate:
    def __init__(self, app: ASGIApp, limits: BodyLimits, authenticate: Authenticator,
                 metrics_token: str | None = None) -> None:
        self.app = app
        self.limits = limits
        self.authenticate = authenticate
        self.metrics_token = metrics_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            if scope["path"] not in PUBLIC_PATHS:
                scope.setdefault("state", {})["principal"] = await self.authenticate(_bearer(headers))
            elif scope["path"] in METRICS_PATHS and self.metrics_token is not None:
                self._check_metrics_token(headers, self.metrics_token)
            limit, named = self.limits.for_request(scope["method"], scope["path"])
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > limit:
                raise Refusal(413, "payload_too_large", f"the request body is larger than the {named}")
        except Refusal as refusal:
            await _refuse(send, refusal)
            return
        guard = _Guard(receive, send, limit)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.exceeded:
                raise  # whatever the app made of the cut-off body, the answer is the 413 below
        if guard.exceeded and not guard.started:
            await _refuse(send, Refusal(413, "payload_too_large", f"the request body is larger than the {named}"))


    @staticmethod
    def _check_metrics_token(headers: dict[bytes, bytes], expected: str) -> None:
        if not hmac.compare_digest(_bearer(headers).encode(), expected.encode()):
            raise Refusal(401, "unauthorized", "the metrics token is wrong (LORAPLEX_METRICS_TOKEN)")


def _bearer(headers: dict[bytes, bytes]) -> str:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refusal(401, "unauthorized", "missing API key: send 'Authorization: Bearer <key>'")
    return token.strip()


async def _refuse(send: Send, refusal: Refusal) -> None:
    body = json.dumps(error_body(refusal.kind, refusal.message)).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    if refusal.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass


class _Guard:
    """Counts body bytes as the app pulls them; once past the limit, nothing more goes in or out."""

    def __init__(self, receive: Receive, send: Send, limit: int) -> None:
        self._receive, self._send, self.limit = receive, send, limit
        self.seen = 0
        self.exceeded = False
        self.started = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                self.exceeded = True
                raise BodyTooLarge(f"{self.seen} bytes")
        return message

    async def send(self, message: Message) -> None:
        if self.exceeded:
            return  # the app's own answer to the cut-off body is replaced by the 413
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)
