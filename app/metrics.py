"""All of the gateway's Prometheus metrics, in one module and one registry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()

# Buckets that fit LLM latencies: tens of milliseconds to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)

TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)

HTTP_REQUESTS = Counter(
    "loraplex_http_requests", "HTTP requests by route, status class and outcome",
    ["route", "status_class", "outcome"], registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "loraplex_request_duration_seconds", "End-to-end request latency by route", ["route"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
# Their latency is observed when the answer ends (a stream's last byte), not when it starts.
GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
for _route in GENERATION_ROUTES:
    REQUEST_LATENCY.labels(_route)  # from zero, so that the first requests show in rate()
TIME_TO_FIRST_TOKEN = Histogram(
    "loraplex_time_to_first_token_seconds", "Time from admission to the first generated text",
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
INTER_TOKEN_LATENCY = Histogram(
    "loraplex_inter_token_latency_seconds", "Time between consecutive pieces of generated text",
    buckets=TOKEN_GAP_BUCKETS, registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    "loraplex_queue_duration_seconds", "Time requests waited in a worker's queue before joining its batch",
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
TENANT_LATENCY = Histogram(
    "loraplex_tenant_request_duration_seconds", "Generation latency of the busiest tenants (the rest: other)",
    ["tenant"], buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
TENANT_TOKENS = Counter(
    "loraplex_tenant_tokens", "Tokens of the busiest tenants (the rest: other), by kind", ["tenant", "kind"],
    registry=REGISTRY,
)
PROMPT_TOKENS = Counter("loraplex_prompt_tokens", "Prompt tokens processed", registry=REGISTRY)
COMPLETION_TOKENS = Counter("loraplex_completion_tokens", "Completion tokens generated", registry=REGISTRY)
IN_FLIGHT = Gauge("loraplex_in_flight_requests", "Generation requests in flight", registry=REGISTRY)
WORKERS_READY = Gauge("loraplex_workers_ready", "Workers ready to serve", registry=REGISTRY)
QUANTIZATION_JOBS = Gauge("loraplex_quantization_jobs", "Quantization jobs in the database, by state", ["state"],
                          registry=REGISTRY)
FINETUNE_JOBS = Gauge("loraplex_finetune_jobs", "Fine-tuning jobs in the database, by state", ["state"],
                      registry=REGISTRY)
FINETUNE_TOKENS = Gauge("loraplex_finetune_trained_tokens",
                        "Tokens trained by the fine-tuning jobs in the database that succeeded (file tokens x epochs)",
                        registry=REGISTRY)
JOB_DURATION_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0)


class JobDurations(Collector):
    """A histogram of finished jobs' durations, read from the database at each scrape (so every gateway
    replica reports the same, and a restart loses nothing)."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.durations: list[float] = []

    def collect(self) -> Iterator[HistogramMetricFamily]:
        durations = list(self.durations)
        buckets = [(str(le), float(sum(1 for d in durations if d <= le))) for le in JOB_DURATION_BUCKETS]
        yield HistogramMetricFamily(self.name, self.documentation, buckets=[*buckets, ("+Inf", float(len(durations)))],
                                    sum_value=sum(durations))


FINETUNE_DURATION = JobDurations("loraplex_finetune_job_duration_seconds",
                                 "Duration of finished fine-tuning jobs (started to finished), from the database")
REGISTRY.register(FINETUNE_DURATION)
RETRIES = Counter(
    "loraplex_failover_retries", "Requests moved to another worker after theirs failed", registry=REGISTRY
)
ADAPTER_ROUTES = Counter(
    "loraplex_adapter_routes", "Adapter requests routed, by whether the chosen worker already held the adapter",
    ["outcome"], registry=REGISTRY,
)
for _outcome in ("resident", "cold"):
    ADAPTER_ROUTES.labels(_outcome)
WORKER_RESTARTS = Counter(
    "loraplex_worker_restarts", "Local workers restarted by the gateway: exited, or hung (alive, not serving)",
    ["reason"], registry=REGISTRY,
)
for _reason in ("exited", "hung"):
    WORKER_RESTARTS.labels(_reason)


def record_tokens(prompt: int, completion: int) -> None:
    PROMPT_TOKENS.inc(prompt)
    COMPLETION_TOKENS.inc(completion)


def outcome(status: int) -> str:
    """A bounded word for what happened to a request."""
    if status < 400:
        return "ok"
    return {429: "rate_limited", 503: "unavailable", 413: "too_large"}.get(
        status, "rejected" if status < 500 else "error"
    )


class TenantLabels:
    """Per-tenant series for the `top` busiest tenants by requests seen; everyone else is `other`.

    A tenant that drops out of the top has its series removed, so label values stay bounded.
    """

    def __init__(self, top: int) -> None:
        self.top = top
        self._counts: dict[str, int] = {}
        self._labelled: set[str] = set()

    def label(self, tenant: str) -> str:
        # Counts only grow, so only the tenant being counted can enter the top: O(top) per request.
        count = self._counts[tenant] = self._counts.get(tenant, 0) + 1
        if tenant in self._labelled:
            return tenant
        if len(self._labelled) < self.top:
            self._labelled.add(tenant)
            return tenant
        quietest = min(self._labelled, key=lambda t: (self._counts[t], t), default=None)
        if quietest is None or count <= self._counts[quietest]:
            return "other"
        self._labelled.discard(quietest)
        _remove_tenant_series(quietest)
        self._labelled.add(tenant)
        return tenant


def _remove_tenant_series(tenant: str) -> None:
    with contextlib.suppress(KeyError):
        TENANT_LATENCY.remove(tenant)
    for kind in ("prompt", "completion"):
        with contextlib.suppress(KeyError):
            TENANT_TOKENS.remove(tenant, kind)


class _WorkerExpositions(Collector):
    """Several workers' expositions as one, each series labelled with its worker's name."""

    def __init__(self, texts: Mapping[str, str | None]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for worker, text in self.texts.items():
            for family in text_string_to_metric_families(text or ""):
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "worker": worker}, sample.value)
        up = GaugeMetricFamily("loraplex_worker_up", "1 when the gateway could scrape the worker's /metrics",
                               labels=["worker"])
        for worker, text in self.texts.items():
            up.add_metric([worker], 0 if text is None else 1)
        yield up
        yield from merged.values()


def merge_worker_metrics(texts: Mapping[str, str | None]) -> bytes:
    """One exposition for all workers (None: the worker could not be scraped), with a `worker` label."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerExpositions(texts))
    return generate_latest(registry)
