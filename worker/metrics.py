"""All of the worker's Prometheus metrics, in one registry.

The engine and the adapter cache record events as they happen (they own them); gauges
are refreshed from plain stats at scrape time. No label carries a request id, prompt
text or adapter name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime

REGISTRY = CollectorRegistry()

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("loraplex_worker_requests", "Generate requests accepted by this worker", registry=REGISTRY)
RUNNING = Gauge("loraplex_worker_running_requests", "Requests in the running batch", registry=REGISTRY)
WAITING = Gauge("loraplex_worker_waiting_requests", "Requests waiting for admission", registry=REGISTRY)
READY = Gauge("loraplex_worker_ready", "1 once the base model is loaded", registry=REGISTRY)
LIVE = Gauge("loraplex_worker_live", "1 while the engine thread runs and makes steps (0: died or stalled)",
             registry=REGISTRY)
HEARTBEAT_AGE = Gauge("loraplex_worker_engine_heartbeat_age_seconds",
                      "Seconds since the engine loop last came round (it does every 50 ms when idle)",
                      registry=REGISTRY)
BATCH_SIZE = Histogram("loraplex_worker_batch_size", "Rows in each decode step",
                       buckets=(1, 2, 4, 8, 16, 32, 64), registry=REGISTRY)
STEP_TIME = Histogram("loraplex_worker_step_duration_seconds", "Time of one forward pass, by phase", ["phase"],
                      buckets=STEP_BUCKETS, registry=REGISTRY)
QUEUE_TIME = Histogram("loraplex_worker_queue_duration_seconds", "Time from arrival to admission into the batch",
                       buckets=QUEUE_BUCKETS, registry=REGISTRY)
GENERATED_TOKENS = Counter("loraplex_worker_generated_tokens", "Tokens generated", registry=REGISTRY)
PROMPT_TOKENS = Counter("loraplex_worker_prompt_tokens", "Prompt tokens prefilled", registry=REGISTRY)

MEMORY = Gauge("loraplex_worker_memory_bytes",
               "Memory by kind: rss; cuda_allocated, cuda_reserved, cuda_total on GPU; device_used and "
               "device_total (CUDA allocated and total on GPU, RSS and physical memory on CPU)",
               ["kind"], registry=REGISTRY)
ADAPTERS_RESIDENT = Gauge("loraplex_worker_adapters_resident", "Adapters held, by cache tier", ["tier"],
                          registry=REGISTRY)
ADAPTER_BYTES = Gauge("loraplex_worker_adapter_bytes", "Bytes of adapter weights held, by cache tier", ["tier"],
                      registry=REGISTRY)
ADAPTER_LOOKUPS = Counter("loraplex_worker_adapter_lookups", "Adapter lookups by result (hit: in a device slot; "
                          "host_hit: in host memory; miss: read from the blob store)", ["result"], registry=REGISTRY)
ADAPTER_LOADS = Counter("loraplex_worker_adapter_loads", "Adapter loads from the blob store, by outcome",
                        ["outcome"], registry=REGISTRY)
ADAPTER_EVICTIONS = Counter("loraplex_worker_adapter_evictions", "Adapters dropped, by tier and reason",
                            ["tier", "reason"], registry=REGISTRY)
ADAPTER_LOAD_TIME = Histogram("loraplex_worker_adapter_load_duration_seconds",
                              "Blob store to host memory: read, verify, parse", buckets=LOAD_BUCKETS, registry=REGISTRY)
SLOT_FILL_TIME = Histogram("loraplex_worker_adapter_slot_fill_duration_seconds",
                           "Host memory to a device slot, on the engine thread: the running batch waits for it",
                           buckets=LOAD_BUCKETS, registry=REGISTRY)
INT8_ROUNDING = Histogram("loraplex_worker_adapter_int8_rounding_ratio",
                          "int8 slots: what an adapter filled into a slot lost to rounding (relative root mean "
                          "square, its worst layer); above LORA_INT8_MAX_ERROR it is refused",
                          buckets=(0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1), registry=REGISTRY)
KV_TOKENS = Gauge("loraplex_worker_kv_cache_tokens", "KV pool token positions: held by running rows "
                  "(each its prompt plus max_tokens), capacity, and the largest free region", ["state"],
                  registry=REGISTRY)
BASE_MODEL = Info("loraplex_worker_base_model", "The base model this worker serves", registry=REGISTRY)

# Every known label value starts at zero, so that rate() and increase() answer 0, not nothing.
for _phase in ("prefill", "decode"):
    STEP_TIME.labels(_phase)
for _result in ("hit", "host_hit", "miss"):
    ADAPTER_LOOKUPS.labels(_result)
for _outcome in ("ok", "failed"):
    ADAPTER_LOADS.labels(_outcome)
for _tier, _reason in (("host", "capacity"), ("device", "capacity"), ("device", "deleted")):
    ADAPTER_EVICTIONS.labels(_tier, _reason)


def observe(runtime: WorkerRuntime) -> None:
    """Refresh the gauges from the runtime's plain stats, at scrape time."""
    health = runtime.health()
    READY.set(1 if health.ready else 0)
    LIVE.set(1 if health.live else 0)
    RUNNING.set(health.running)
    WAITING.set(health.waiting)
    rss = psutil.Process().memory_info().rss
    MEMORY.labels("rss").set(rss)
    loaded = runtime.loaded
    if loaded is None:
        return
    HEARTBEAT_AGE.set(loaded.engine.stalled_for())
    regions = loaded.engine.regions
    KV_TOKENS.labels("reserved").set(regions.used)
    KV_TOKENS.labels("capacity").set(regions.capacity)
    KV_TOKENS.labels("largest_free").set(regions.largest_free)
    BASE_MODEL.info({"model": runtime.config.model_name, "quantization": loaded.quantization,
                     "device": str(loaded.device)})
    for tier, (count, nbytes) in loaded.adapters.tier_stats().items():
        ADAPTERS_RESIDENT.labels(tier).set(count)
        ADAPTER_BYTES.labels(tier).set(nbytes)
    if loaded.device.type == "cuda":
        import torch

        allocated = torch.cuda.memory_allocated(loaded.device)
        total = torch.cuda.get_device_properties(loaded.device).total_memory
        MEMORY.labels("cuda_allocated").set(allocated)
        MEMORY.labels("cuda_reserved").set(torch.cuda.memory_reserved(loaded.device))
        MEMORY.labels("cuda_total").set(total)
        MEMORY.labels("device_used").set(allocated)
        MEMORY.labels("device_total").set(total)
    else:  # a CPU worker's device memory is the host's
        MEMORY.labels("device_used").set(rss)
        MEMORY.labels("device_total").set(psutil.virtual_memory().total)
