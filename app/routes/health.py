"""Liveness, readiness and the Prometheus scrape endpoint (no auth)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.deps import ServicesDep
from app.json_body import StrictJsonRoute

router = APIRouter(tags=["ops"], route_class=StrictJsonRoute)


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready", response_model=None)
async def ready(services: ServicesDep) -> JSONResponse:
    slots = services.pool.slots
    body = {
        "status": "ready" if services.pool.ready() else "starting",
        "workers": [{"name": s.client.name, "ready": s.health.ready, "error": s.health.error} for s in slots],
    }
    if services.pool.ready():
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics")
async def prometheus(services: ServicesDep) -> Response:
    metrics.WORKERS_READY.set(sum(1 for s in services.pool.slots if s.health.ready))
    for state, count in (await run_in_threadpool(services.jobs.count_by_state)).items():
        metrics.QUANTIZATION_JOBS.labels(state).set(count)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/workers")
async def worker_metrics(services: ServicesDep) -> Response:
    """Every worker's /metrics in one scrape, each series with a `worker` label."""
    slots = services.pool.slots
    texts = await asyncio.gather(*(s.client.metrics() for s in slots), return_exceptions=True)
    merged = metrics.merge_worker_metrics(
        {s.client.name: t if isinstance(t, str) else None for s, t in zip(slots, texts, strict=True)}
    )
    return Response(merged, media_type=CONTENT_TYPE_LATEST)
