"""The one interface routes use to talk to a worker, and its HTTP implementation."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

import httpx

from app.errors import WorkerUnavailable, worker_error
from worker.protocol import EvictRequest, GenerateEvent, GenerateRequest, ReloadRequest, WorkerHealth


class WorkerClient(Protocol):
    name: str
    base_url: str  # where its internal API and its own /metrics answer

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]: ...

    async def evict(self, key: str) -> None: ...

    async def reload(self, model_path: str, model_name: str, drain_s: float) -> None: ...

    async def health(self) -> WorkerHealth: ...

    async def metrics(self) -> str: ...

    async def close(self) -> None: ...


class HttpWorkerClient:
    """Talks to a worker's internal API, local or on another machine."""

    def __init__(self, name: str, base_url: str, *, connect_timeout: float = 2.0, idle_timeout: float = 30.0,
                 token: str | None = None) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        # A live worker sends a line (an event or a blank keep-alive) every few seconds on every
        # open stream; silence for `idle_timeout` means it is hung, and the request moves on.
        timeout = httpx.Timeout(connect=connect_timeout, read=idle_timeout, write=30.0, pool=30.0)
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}  # worker.auth
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, headers=headers)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        try:
            async with self._http.stream("POST", "/generate", content=request.model_dump_json(),
                                         headers={"content-type": "application/json"}) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _status_error(self.name, resp, request.request_id)
                async for line in resp.aiter_lines():
                    if line:
                        yield GenerateEvent.model_validate_json(line)
        except httpx.TimeoutException as exc:
            raise WorkerUnavailable(f"worker {self.name} sent nothing for too long (hung?)") from exc
        except httpx.TransportError as exc:
            raise WorkerUnavailable(f"worker {self.name} is unreachable or died mid-request") from exc

    async def evict(self, key: str) -> None:
        await self._post("/adapters/evict", EvictRequest(key=key).model_dump_json())

    async def reload(self, model_path: str, model_name: str, drain_s: float) -> None:
        """Ask the worker to move onto another base model; it answers at once and loads in the background."""
        body = ReloadRequest(model_path=model_path, model_name=model_name, drain_s=drain_s).model_dump_json()
        try:
            resp = await self._http.post("/reload", content=body, headers={"content-type": "application/json"},
                                         timeout=10.0)
        except httpx.TransportError as exc:
            raise WorkerUnavailable(f"worker {self.name} is unreachable: {type(exc).__name__}") from exc
        if resp.status_code != 202:
            raise WorkerUnavailable(f"worker {self.name} refused to move to {model_name}: {resp.text[:200]}")

    async def health(self) -> WorkerHealth:
        resp = await self._http.get("/health", timeout=2.0)
        resp.raise_for_status()
        return WorkerHealth.model_validate_json(resp.content)

    async def metrics(self) -> str:
        """The worker's own Prometheus exposition text."""
        resp = await self._http.get("/metrics", timeout=5.0)
        resp.raise_for_status()
        return resp.text

    async def close(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: str) -> None:
        with contextlib.suppress(httpx.TransportError):  # a dead worker has nothing left to evict
            await self._http.post(path, content=body, headers={"content-type": "application/json"}, timeout=5.0)


def _status_error(name: str, resp: httpx.Response, request_id: str) -> Exception:
    try:
        message = resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = resp.text[:200]
    return worker_error(resp.status_code, message, request_id, name)
