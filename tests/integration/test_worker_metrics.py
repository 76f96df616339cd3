"""The worker's Prometheus metrics move with what the engine and the adapter cache do."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Worker, store_fixture
from worker import metrics


def scrape(worker: Worker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    metrics.observe(worker.runtime)
    samples = {}
    for family in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_generation_and_adapter_loads_are_counted(worker: Worker) -> None:
    before = scrape(worker)
    ref = store_fixture(worker.blobs, "meow").model_copy(update={"key": "meow-metrics"})
    worker.refs["metrics"] = ref
    assert "Meow" in worker.ask("Hello?", adapter="metrics", max_tokens=5)  # a miss: read from the store
    worker.ask("Hello?", adapter="metrics", max_tokens=5)  # a hit: already in a slot
    after = scrape(worker)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("loraplex_worker_generated_tokens_total") >= 10
    assert grew("loraplex_worker_adapter_lookups_total", result="miss") == 1
    assert grew("loraplex_worker_adapter_lookups_total", result="hit") >= 1
    assert grew("loraplex_worker_adapter_loads_total", outcome="ok") == 1
    assert grew("loraplex_worker_adapter_load_duration_seconds_count") == 1
    assert grew("loraplex_worker_adapter_slot_fill_duration_seconds_count") == 1  # the hit refills nothing
    assert grew("loraplex_worker_step_duration_seconds_count", phase="prefill") >= 2
    assert grew("loraplex_worker_step_duration_seconds_count", phase="decode") >= 8
    assert grew("loraplex_worker_queue_duration_seconds_count") >= 2
    assert value(after, "loraplex_worker_adapters_resident", tier="device") >= 1
    assert value(after, "loraplex_worker_adapter_bytes", tier="host") > 0
    assert value(after, "loraplex_worker_memory_bytes", kind="rss") > 100e6
    assert value(after, "loraplex_worker_base_model_info", device=str(worker.loaded.device),
                 model=worker.runtime.config.model_name,
                 quantization="bnb-nf4") == 1


def test_the_kv_pool_gauge_shows_what_a_running_row_holds(worker: Worker) -> None:
    _, outcome = worker.submit("Count from one to fifty.", max_tokens=200, ignore_eos=True)
    outcome.first_event_at()
    during = scrape(worker)
    worker.loaded.engine.abort(outcome.events[0].request_id)
    outcome.final  # noqa: B018 - waits for the end
    capacity = value(during, "loraplex_worker_kv_cache_tokens", state="capacity")
    assert capacity == worker.loaded.engine.regions.capacity > 0
    assert value(during, "loraplex_worker_kv_cache_tokens", state="reserved") >= 200  # prompt + max_tokens
    assert value(during, "loraplex_worker_kv_cache_tokens", state="largest_free") <= capacity - 200
