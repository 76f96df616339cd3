"""All of the worker's Prometheus metrics, in one registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

REGISTRY = CollectorRegistry()
REQUESTS = Counter("loraplex_worker_requests", "Generate requests accepted by this worker", registry=REGISTRY)
RUNNING = Gauge("loraplex_worker_running_requests", "Requests in the running batch", registry=REGISTRY)
WAITING = Gauge("loraplex_worker_waiting_requests", "Requests waiting for admission", registry=REGISTRY)
ADAPTERS_RESIDENT = Gauge(
    "loraplex_worker_adapters_resident", "Adapters held in device slots", registry=REGISTRY
)
READY = Gauge("loraplex_worker_ready", "1 once the base model is loaded", registry=REGISTRY)
RSS = Gauge("loraplex_worker_resident_memory_bytes", "Resident memory of the worker process", registry=REGISTRY)


def observe(runtime: WorkerRuntime) -> None:
    """Refresh the gauges from the runtime's plain stats, at scrape time."""
    health = runtime.health()
    READY.set(1 if health.ready else 0)
    RUNNING.set(health.running)
    WAITING.set(health.waiting)
    ADAPTERS_RESIDENT.set(len(health.adapters_resident))
    RSS.set(psutil.Process().memory_info().rss)
