"""The gateway's metrics: outcomes, token timing, bounded per-tenant series, nothing private in labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from app.metrics import TENANT_LATENCY, TenantLabels
from app.settings import Settings
from tests.unit.conftest import ADMIN_KEY, Gateway, gateway_client
from tests.unit.fakes import FakeWorkerClient


def samples(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = gw.client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_requests_are_counted_by_outcome_and_timed_per_token(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("metered")
    before = samples(gateway)
    assert gateway.client.post("/generate", headers=tenant, json={"prompt": "one two three"}).status_code == 200
    too_long = {"prompt": "x", "max_tokens": 10**6}
    assert gateway.client.post("/generate", headers=tenant, json=too_long).status_code == 400
    after = samples(gateway)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("loraplex_http_requests_total", route="/generate", status_class="2xx", outcome="ok") == 1
    assert grew("loraplex_http_requests_total", route="/generate", status_class="4xx", outcome="rejected") == 1
    assert grew("loraplex_time_to_first_token_seconds_count") == 1
    assert grew("loraplex_inter_token_latency_seconds_count") == 2  # three words, two gaps
    assert grew("loraplex_tenant_tokens_total", tenant="metered", kind="completion") == 3
    assert grew("loraplex_tenant_request_duration_seconds_count", tenant="metered") == 1
    labels = {v for (_, pairs) in after for _, v in pairs}
    assert not any("one two" in v or len(v) == 32 for v in labels)  # no prompt text, no request ids


def test_only_the_busiest_tenants_get_their_own_series() -> None:
    labels = TenantLabels(top=2)
    for tenant, requests in (("big", 5), ("medium", 3)):
        for _ in range(requests):
            assert labels.label(tenant) == tenant
    TENANT_LATENCY.labels("medium").observe(1.0)
    assert labels.label("small") == "other"
    for _ in range(4):
        labels.label("rising")
    assert labels.label("rising") == "rising"  # now busier than "medium", which becomes `other`
    assert labels.label("medium") == "other"
    assert ("medium",) not in {tuple(s.labels.values()) for m in TENANT_LATENCY.collect() for s in m.samples}


def test_one_scrape_of_the_gateway_shows_every_worker(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path, admin_key=SecretStr(ADMIN_KEY))
    workers = [FakeWorkerClient("w0"), FakeWorkerClient("w1"), FakeWorkerClient("w2")]
    with gateway_client(settings, workers) as client:
        workers[2].ready = False  # its scrape fails; the others still show
        text = client.get("/metrics/workers").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("loraplex_worker_up", (("worker", "w0"),))] == 1
    assert samples[("loraplex_worker_up", (("worker", "w2"),))] == 0
    assert samples[("loraplex_worker_memory_bytes", (("kind", "rss"), ("worker", "w1")))] == 1e6
    assert ("loraplex_worker_requests_total", (("worker", "w0"),)) in samples
    assert not any(dict(labels).get("worker") == "w2" for name, labels in samples if name != "loraplex_worker_up")
    assert text.count("# TYPE loraplex_worker_memory_bytes gauge") == 1


class CountingWorker(FakeWorkerClient):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.scrapes = 0

    async def metrics(self) -> str:
        self.scrapes += 1
        return await super().metrics()


def test_the_worker_fan_out_is_cached_so_scrapes_cannot_hammer_the_workers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path / "a", admin_key=SecretStr(ADMIN_KEY), metrics_fanout_cache_s=30)
    worker = CountingWorker("w0")
    with gateway_client(settings, [worker]) as client:
        texts = {client.get("/metrics/workers").text for _ in range(20)}
    assert worker.scrapes == 1 and len(texts) == 1  # twenty scrapes, one question to the worker
    settings = Settings(data_dir=tmp_path / "b", admin_key=SecretStr(ADMIN_KEY), metrics_fanout_cache_s=0)
    with gateway_client(settings, [worker]) as client:
        for _ in range(3):
            client.get("/metrics/workers")
    assert worker.scrapes == 4  # no cache: each scrape asks


def test_a_metrics_token_guards_both_scrapes_and_nothing_else(tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = "m" * 40
    settings = Settings(data_dir=tmp_path, admin_key=SecretStr(ADMIN_KEY), metrics_token=SecretStr(token))
    with gateway_client(settings, [FakeWorkerClient("w0")]) as client:
        for path in ("/metrics", "/metrics/workers"):
            assert client.get(path).status_code == 401
            refused = client.get(path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})  # not the admin key either
            assert refused.status_code == 401 and "LORAPLEX_METRICS_TOKEN" in refused.json()["error"]["message"]
            assert client.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert client.get("/health/live").status_code == 200  # probes stay open
