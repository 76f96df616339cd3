"""All of the gateway's Prometheus metrics, in one module and one registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

# Buckets that fit LLM latencies: tens of milliseconds to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)

HTTP_REQUESTS = Counter(
    "loraplex_http_requests", "HTTP requests by route and status class", ["route", "status_class"],
    registry=REGISTRY,
)
REQUEST_LATENCY = Histogram(
    "loraplex_request_duration_seconds", "End-to-end request latency by route", ["route"],
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "loraplex_time_to_first_token_seconds", "Time from admission to the first streamed token",
    buckets=LATENCY_BUCKETS, registry=REGISTRY,
)
PROMPT_TOKENS = Counter("loraplex_prompt_tokens", "Prompt tokens processed", registry=REGISTRY)
COMPLETION_TOKENS = Counter("loraplex_completion_tokens", "Completion tokens generated", registry=REGISTRY)
IN_FLIGHT = Gauge("loraplex_in_flight_requests", "Generation requests in flight", registry=REGISTRY)
WORKERS_READY = Gauge("loraplex_workers_ready", "Workers ready to serve", registry=REGISTRY)


def record_tokens(prompt: int, completion: int) -> None:
    PROMPT_TOKENS.inc(prompt)
    COMPLETION_TOKENS.inc(completion)
