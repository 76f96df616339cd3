"""Refuse request bodies over the size limit while they stream in, before they are stored anywhere."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Multipart framing (boundaries, part headers, the name field) around the files themselves.
FRAMING_SLACK = 1024 * 1024


class BodySizeLimit:
    """A declared Content-Length over the limit is refused unread; a chunked body is counted as it
    arrives and refused the moment it passes the limit (whatever the app was doing with it)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit + FRAMING_SLACK
        self.message = f"the request body is larger than the {limit}-byte limit (max_adapter_bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        guard = _Guard(receive, send, self.limit)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.exceeded:
                raise  # whatever the app made of the cut-off body, the answer is the 413 below
        if guard.exceeded and not guard.started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": {"type": "payload_too_large", "message": self.message}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
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
