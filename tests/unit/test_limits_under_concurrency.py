"""A tenant's count limits hold when its own requests race each other, on SQLite and PostgreSQL.

Each limit is checked by counting the tenant's rows and then inserting one; without the tenant held
for the whole transaction, requests that all counted before any inserted all got in.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import httpx

from tests.factory import adapter_files
from tests.unit.conftest import Gateway
from tests.unit.test_finetune_files import jsonl, upload
from tests.unit.test_finetune_jobs import create, training_file

RACERS = 8


def race(call: Callable[[int], httpx.Response]) -> Counter[int]:
    """`call(i)` on RACERS threads released at once; the status codes they got."""
    start = threading.Barrier(RACERS)
    codes: list[int] = []

    def run(i: int) -> None:
        start.wait()
        codes.append(call(i).status_code)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return Counter(codes)


def test_racing_uploads_stop_at_the_tenants_file_limit(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    gateway.settings.tenant_max_files = 3
    codes = race(lambda i: upload(gateway, tenant, jsonl(12, answer=f"Beep {i}.")))
    assert codes == {200: 3, 429: RACERS - 3}
    assert len(gateway.client.get("/v1/files", headers=tenant).json()["data"]) == 3


def test_racing_jobs_stop_at_the_tenants_active_job_limit(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    gateway.settings.finetune_max_active_jobs = 2
    file_id = training_file(gateway, tenant)
    codes = race(lambda i: create(gateway, tenant, training_file=file_id, suffix=f"r{i}"))
    assert codes == {200: 2, 429: RACERS - 2}
    assert len(gateway.client.get("/v1/fine_tuning/jobs", headers=tenant).json()["data"]) == 2


def test_racing_uploads_of_new_names_stop_at_the_tenants_adapter_limit(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    gateway.settings.tenant_max_adapters = 2
    uploads = [adapter_files({"model.layers.0.self_attn.q_proj": [16, 16]}, seed=i) for i in range(RACERS)]

    def post(i: int) -> httpx.Response:
        config, weights = uploads[i]
        return gateway.client.post("/adapters", headers=tenant, data={"name": f"a{i}"}, files=[
            ("files", ("adapter_config.json", config)), ("files", ("adapter_model.safetensors", weights))])

    codes = race(post)
    assert codes[201] == 2 and sum(codes.values()) == RACERS and set(codes) <= {201, 429}
    assert len(gateway.client.get("/adapters", headers=tenant).json()) == 2
