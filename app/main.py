"""The gateway app factory."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.bases import BaseCheckpoints
from adapters.blobstore import open_blob_store
from adapters.db import make_engine, make_sessionmaker
from adapters.finetuning import FineTuningJobs, TrainingFiles
from adapters.jobs import JobStore
from adapters.registry import AdapterRegistry
from app import metrics
from app.auth import TenantService, load_or_create_admin_key
from app.deps import Services, principal_for
from app.errors import install_error_handlers
from app.gate import BodyLimits, RequestGate
from app.quotas import Quotas, RequestQuotas
from app.redis_quotas import RedisQuotas
from app.routes import adapters, admin, finetune, generate, health, jobs, keys, openai
from app.settings import Settings
from app.workers.client import HttpWorkerClient
from app.workers.pool import WorkerPool, WorkerSlot
from app.workers.supervisor import LocalWorkerProcess, device_for, visible_gpu_count
from worker.auth import TOKEN_ENV

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
    bases = BaseCheckpoints(sessions)
    registry = AdapterRegistry(sessions, blobs, settings.max_lora_rank, settings.max_adapter_delta, bases)
    services = Services(
        settings=settings,
        sessions=sessions,
        registry=registry,
        tenants=TenantService(sessions, registry),
        pool=pool if pool is not None else _configured_pool(settings, bases),
        admin_key=admin_key,
        quotas=_quotas(settings),
        tenant_labels=metrics.TenantLabels(settings.metrics_top_tenants),
        jobs=JobStore(sessions),
        base_models=bases,
        training_files=TrainingFiles(sessions, registry.blob_refs),
        finetune_jobs=FineTuningJobs(sessions),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await services.pool.start()
        sweeper = asyncio.create_task(_sweep_blobs(registry, settings.blob_sweep_interval_s))
        yield
        sweeper.cancel()
        await services.pool.stop()
        if isinstance(services.quotas, RedisQuotas):
            services.quotas.close()

    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    install_error_handlers(app)
    limits = BodyLimits(upload_bytes=settings.max_adapter_bytes, request_bytes=settings.max_request_bytes,
                        file_bytes=settings.max_training_file_bytes)
    metrics_token = settings.metrics_token.get_secret_value() if settings.metrics_token is not None else None
    app.add_middleware(RequestGate, limits=limits, authenticate=principal_for(services), metrics_token=metrics_token)
    app.add_middleware(RequestMetrics)  # outermost: counts what the gate refuses too
    for module in (health, admin, jobs, adapters, keys, generate, openai, finetune):
        app.include_router(module.router)
    return app


async def _sweep_blobs(registry: AdapterRegistry, interval_s: float) -> None:
    """At start and then periodically: remove blobs no version refers to (a crash between writing a
    blob and committing its row leaves one). Safe beside uploads, on any number of gateways."""
    while True:
        try:
            removed = await run_in_threadpool(registry.blob_refs.sweep)
            if removed:
                log.info("blob sweep: removed %d unreferenced blobs", removed)
        except Exception:  # a database or store that is down now: the next sweep tries again
            log.exception("blob sweep failed")
        await asyncio.sleep(interval_s)


def _quotas(settings: Settings) -> Quotas:
    """Tenant limits counted in Redis when several gateways share them, else in this process."""
    if settings.redis_url is None:
        return RequestQuotas()
    return RedisQuotas(settings.redis_url, lease_s=settings.redis_lease_s, prefix=settings.redis_prefix)


def _configured_pool(settings: Settings, bases: BaseCheckpoints) -> WorkerPool:
    slots: list[WorkerSlot] = []
    token = settings.worker_token.get_secret_value() if settings.worker_token is not None else None
    if settings.workers:
        base = bases.active_or_none()
        if base is None:
            raise RuntimeError("no base model is registered: run `loraplex models prepare` first")
        gpus = visible_gpu_count() if settings.worker_device in ("auto", "cuda") else 0
        local_token = token or secrets.token_urlsafe(32)  # known to this gateway and its own workers only
        for i in range(settings.workers):
            config = settings.worker_config(i, base.path, base.name, device_for(settings.worker_device, i, gpus))
            client = HttpWorkerClient(f"local-{i}", f"http://127.0.0.1:{config.port}",
                                      idle_timeout=settings.worker_idle_timeout_s, token=local_token)
            process = LocalWorkerProcess(config, env={TOKEN_ENV: local_token})  # by environment, not argv
            slots.append(WorkerSlot(client=client, process=process))
    if settings.worker_urls and token is None:
        log.warning("remote workers without LORAPLEX_WORKER_TOKEN: they must run without one, on loopback")
    for i, url in enumerate(settings.worker_urls):
        client = HttpWorkerClient(f"remote-{i}", url, idle_timeout=settings.worker_idle_timeout_s, token=token)
        slots.append(WorkerSlot(client=client))
    return WorkerPool(slots, overload=settings.max_batch_size, hang_timeout=settings.worker_stall_timeout_s,
                      start_timeout=settings.worker_start_timeout_s)


class RequestMetrics:
    """Outermost: every request is counted, those refused at the gate and those that ended in an
    unhandled exception (the 500 the error handler sends) included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")  # the route template, never the raw path
            metrics.HTTP_REQUESTS.labels(path, f"{status // 100}xx", metrics.outcome(status)).inc()
            if path not in metrics.GENERATION_ROUTES:
                metrics.REQUEST_LATENCY.labels(path).observe(time.monotonic() - started)
