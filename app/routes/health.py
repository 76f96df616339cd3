"""Liveness, readiness and the Prometheus scrape endpoint (no auth)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app import metrics
from app.deps import ServicesDep

router = APIRouter(tags=["ops"])


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
    return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)
