"""Only the gateway may use a worker: a shared token on every route but the bare probes.

A worker resolves adapters by content key, lists the keys it holds and evicts on request;
anyone who could call it directly would generate without keys or quotas and reach any
tenant's private adapter. So every call carries `Authorization: Bearer <token>`, the token
the gateway was given (LORAPLEX_WORKER_TOKEN) or, for the workers `serve` starts itself,
one it made up at start. The probes Kubernetes calls (`/health/live`, `/health/ready`) and
`/metrics` answer anyone: they say whether the worker runs and how busy it is, never which
adapters it holds or whose requests it serves.
"""

from __future__ import annotations

import hmac
import ipaddress
import json

from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_ENV = "LORAPLEX_WORKER_TOKEN"
OPEN_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})
MIN_TOKEN_CHARS = 32


class TokenGate:
    """ASGI middleware: 401 for a call without the worker token, before its body is read."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": {"type": "unauthorized", "message": "this worker answers only its gateway: "
                                     "the worker token is missing or wrong"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def check_token(token: str | None, host: str) -> None:
    """A worker reachable from other machines must have a token, and one hard to guess."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{TOKEN_ENV} must be at least {MIN_TOKEN_CHARS} characters")
    if token is None and not _loopback(host):
        raise ValueError(f"a worker listening on {host} needs {TOKEN_ENV} (the gateway's worker token); "
                         "without one, anyone who reaches its port could generate and use any adapter")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
