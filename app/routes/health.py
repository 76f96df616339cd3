"""Liveness, readiness and the Prometheus scrape endpoints (no API key; the scrapes take a metrics token if set)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Request, Response
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
    for state, count in (await run_in_threadpool(services.finetune_jobs.count_by_state)).items():
        metrics.FINETUNE_JOBS.labels(state).set(count)
    metrics.FINETUNE_TOKENS.set(await run_in_threadpool(services.finetune_jobs.tokens_trained))
    metrics.FINETUNE_DURATION.durations = await run_in_threadpool(services.finetune_jobs.finished_durations)
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/workers")
async def worker_metrics(services: ServicesDep, request: Request) -> Response:
    """Every worker's /metrics in one scrape, each series with a `worker` label.

    Answers from a copy at most `metrics_fanout_cache_s` old, and concurrent scrapes share one
    fan-out: however often it is called, each worker is asked at most once per that interval.
    """
    cache: _FanOut = request.app.state.__dict__.setdefault("worker_metrics", _FanOut())
    async with cache.lock:
        if time.monotonic() - cache.at > services.settings.metrics_fanout_cache_s or cache.text is None:
            slots = services.pool.slots
            texts = await asyncio.gather(*(s.client.metrics() for s in slots), return_exceptions=True)
            cache.text = metrics.merge_worker_metrics(
                {s.client.name: t if isinstance(t, str) else None for s, t in zip(slots, texts, strict=True)}
            )
            cache.at = time.monotonic()
        return Response(cache.text, media_type=CONTENT_TYPE_LATEST)


@dataclass
class _FanOut:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    text: bytes | None = None
    at: float = 0.0
