"""The gateway app factory."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from adapters.blobstore import open_blob_store
from adapters.db import make_engine, make_sessionmaker
from adapters.jobs import BaseModels, JobStore
from adapters.models import BaseModel
from adapters.registry import AdapterRegistry
from app import metrics
from app.auth import TenantService, load_or_create_admin_key
from app.body_limit import BodySizeLimit
from app.deps import Services
from app.errors import install_error_handlers
from app.quotas import RequestQuotas
from app.routes import adapters, admin, generate, health, jobs, openai
from app.settings import Settings
from app.workers.client import HttpWorkerClient
from app.workers.pool import WorkerPool, WorkerSlot
from app.workers.supervisor import LocalWorkerProcess, WorkerLaunch, device_for, visible_gpu_count

log = logging.getLogger(__name__)


def build_app(settings: Settings, pool: WorkerPool | None = None) -> FastAPI:
    """Build the gateway. `pool` replaces the configured workers (tests pass a fake one)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    blobs = open_blob_store(settings.resolved_blob_url)
    blobs.clean_temp()
    admin_key = (
        settings.admin_key.get_secret_value() if settings.admin_key else load_or_create_admin_key(settings.data_dir)
    )
    services = Services(
        settings=settings,
        sessions=sessions,
        registry=AdapterRegistry(sessions, blobs, settings.max_lora_rank, settings.max_adapter_delta),
        tenants=TenantService(sessions),
        pool=pool if pool is not None else _configured_pool(settings, sessions),
        admin_key=admin_key,
        quotas=RequestQuotas(),
        tenant_labels=metrics.TenantLabels(settings.metrics_top_tenants),
        jobs=JobStore(sessions),
        base_models=BaseModels(sessions),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.pool.start()
        yield
        await services.pool.stop()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    app.middleware("http")(_count_requests)
    app.add_middleware(BodySizeLimit, limit=settings.max_adapter_bytes)  # outermost: before anything reads
    for module in (health, admin, jobs, adapters, generate, openai):
        app.include_router(module.router)
    return app


def _configured_pool(settings: Settings, sessions: sessionmaker[Session]) -> WorkerPool:
    slots: list[WorkerSlot] = []
    if settings.workers:
        with sessions() as session:
            base = session.scalar(select(BaseModel).where(BaseModel.active.is_(True)))
        if base is None:
            raise RuntimeError("no base model is registered: run `loraplex models prepare` first")
        gpus = visible_gpu_count() if settings.worker_device in ("auto", "cuda") else 0
        for i in range(settings.workers):
            launch = WorkerLaunch(
                port=settings.worker_base_port + i, model_path=base.path, model_name=base.name,
                blob_url=settings.resolved_blob_url, device=device_for(settings.worker_device, i, gpus),
                threads=settings.worker_threads, max_batch_size=settings.max_batch_size,
                adapter_slots=settings.adapter_slots, host_adapter_cache=settings.host_adapter_cache,
                max_lora_rank=settings.max_lora_rank, max_waiting=settings.max_waiting,
                kv_cache_mb=settings.kv_cache_mb, stall_timeout_s=settings.worker_stall_timeout_s,
            )
            client = HttpWorkerClient(f"local-{i}", f"http://127.0.0.1:{launch.port}",
                                      idle_timeout=settings.worker_idle_timeout_s)
            slots.append(WorkerSlot(client=client, process=LocalWorkerProcess(launch)))
    for i, url in enumerate(settings.worker_urls):
        client = HttpWorkerClient(f"remote-{i}", url, idle_timeout=settings.worker_idle_timeout_s)
        slots.append(WorkerSlot(client=client))
    return WorkerPool(slots, overload=settings.max_batch_size, hang_timeout=settings.worker_stall_timeout_s,
                      start_timeout=settings.worker_start_timeout_s)


async def _count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    started = time.monotonic()
    response = await call_next(request)
    route = request.scope.get("route")
    path = getattr(route, "path", "unmatched")  # the route template, never the raw path
    status = response.status_code
    metrics.HTTP_REQUESTS.labels(path, f"{status // 100}xx", metrics.outcome(status)).inc()
    if path != "/generate":
        metrics.REQUEST_LATENCY.labels(path).observe(time.monotonic() - started)
    return response
