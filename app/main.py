"""The gateway app factory."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import select

from adapters.blobstore import LocalBlobStore
from adapters.db import make_engine, make_sessionmaker
from adapters.models import BaseModel
from adapters.registry import AdapterRegistry
from app import metrics
from app.auth import TenantService, load_or_create_admin_key
from app.deps import Services
from app.errors import error_body, install_error_handlers
from app.routes import adapters, admin, generate, health
from app.settings import Settings
from app.workers.client import HttpWorkerClient
from app.workers.pool import WorkerPool, WorkerSlot
from app.workers.supervisor import LocalWorkerProcess, WorkerLaunch

log = logging.getLogger(__name__)


def build_app(settings: Settings, pool: WorkerPool | None = None) -> FastAPI:
    """Build the gateway. `pool` replaces the configured workers (tests pass a fake one)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    blobs = LocalBlobStore(settings.blob_dir)
    blobs.clean_temp()
    admin_key = (
        settings.admin_key.get_secret_value() if settings.admin_key else load_or_create_admin_key(settings.data_dir)
    )
    services = Services(
        settings=settings,
        sessions=sessions,
        registry=AdapterRegistry(sessions, blobs, settings.max_lora_rank),
        tenants=TenantService(sessions),
        pool=pool if pool is not None else _configured_pool(settings, sessions),
        admin_key=admin_key,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.pool.start()
        yield
        await services.pool.stop()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    app.middleware("http")(_limit_upload_size(settings.max_adapter_bytes))
    app.middleware("http")(_count_requests)
    for module in (health, admin, adapters, generate):
        app.include_router(module.router)
    return app


def _configured_pool(settings: Settings, sessions) -> WorkerPool:  # type: ignore[no-untyped-def]
    slots: list[WorkerSlot] = []
    if settings.workers:
        with sessions() as session:
            base = session.scalar(select(BaseModel).where(BaseModel.active.is_(True)))
        if base is None:
            raise RuntimeError("no base model is registered: run `loraplex models prepare` first")
        for i in range(settings.workers):
            launch = WorkerLaunch(
                port=settings.worker_base_port + i, model_path=base.path, model_name=base.name,
                blob_dir=str(settings.blob_dir.resolve()), device=_device_for(settings.worker_device, i),
                threads=settings.worker_threads, max_batch_size=settings.max_batch_size,
                adapter_slots=settings.adapter_slots, host_adapter_cache=settings.host_adapter_cache,
                max_lora_rank=settings.max_lora_rank,
            )
            client = HttpWorkerClient(f"local-{i}", f"http://127.0.0.1:{launch.port}")
            slots.append(WorkerSlot(client=client, process=LocalWorkerProcess(launch)))
    for i, url in enumerate(settings.worker_urls):
        slots.append(WorkerSlot(client=HttpWorkerClient(f"remote-{i}", url)))
    return WorkerPool(slots, overload=settings.max_batch_size)


def _device_for(device: str, index: int) -> str:
    # "cuda" with several local workers pins each to its own GPU.
    return f"cuda:{index}" if device == "cuda" else device


def _limit_upload_size(limit: int) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    async def middleware(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        declared = request.headers.get("content-length")
        # Multipart framing adds a little; anything far past the limit is refused before it is read.
        if declared and declared.isdigit() and int(declared) > limit + 1024 * 1024:
            message = f"the request body is larger than the {limit}-byte limit (max_adapter_bytes)"
            body = error_body("payload_too_large", message)
            return JSONResponse(body, status_code=413)
        return await call_next(request)

    return middleware


async def _count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    started = time.monotonic()
    response = await call_next(request)
    route = request.scope.get("route")
    path = getattr(route, "path", "unmatched")  # the route template, never the raw path
    metrics.HTTP_REQUESTS.labels(path, f"{response.status_code // 100}xx").inc()
    if path != "/generate":
        metrics.REQUEST_LATENCY.labels(path).observe(time.monotonic() - started)
    return response
