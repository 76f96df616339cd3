"""A worker that fails: requests move to another one while the client has seen nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.settings import Settings
from tests.unit.conftest import ADMIN_KEY, gateway_client
from tests.unit.fakes import FakeWorkerClient


@pytest.fixture
def two_workers(tmp_path) -> Iterator[tuple[TestClient, FakeWorkerClient, FakeWorkerClient, dict[str, str]]]:  # type: ignore[no-untyped-def]
    first, second = FakeWorkerClient("fake-0"), FakeWorkerClient("fake-1")
    settings = Settings(data_dir=tmp_path, admin_key=SecretStr(ADMIN_KEY))
    with gateway_client(settings, [first, second]) as client:
        key = client.post("/admin/tenants", json={"name": "t"},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["api_key"]
        yield client, first, second, {"Authorization": f"Bearer {key}"}


def test_a_worker_failing_before_output_is_retried_on_another(two_workers) -> None:  # type: ignore[no-untyped-def]
    client, first, second, tenant = two_workers
    first.fail_after = second.fail_after = 0
    assert client.post("/generate", headers=tenant, json={"prompt": "a b c"}).status_code == 503  # none left
    second.fail_after = None
    resp = client.post("/generate", headers=tenant, json={"prompt": "a b c"})
    assert resp.status_code == 200 and resp.json()["text"] == "a b c "
    assert resp.headers["X-Loraplex-Worker"] == "fake-1"  # the worker that answered
    resp = client.post("/generate", headers=tenant, json={"prompt": "a b c", "stream": True})
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: ")]
    assert "".join(e.get("text", "") for e in events) == "a b c " and events[-1]["type"] == "done"
    assert len(first.requests) >= 2 and len(second.requests) >= 2


def test_whole_answers_fail_over_even_mid_generation(two_workers) -> None:  # type: ignore[no-untyped-def]
    client, first, second, tenant = two_workers
    first.fail_after = second.fail_after = 1  # whichever is picked first dies after one word
    resp = client.post("/generate", headers=tenant, json={"prompt": "a b c"})
    assert resp.status_code == 503  # both died
    first.fail_after = None
    second.fail_after = 1
    for _ in range(3):
        resp = client.post("/generate", headers=tenant, json={"prompt": "a b c"})
        assert resp.status_code == 200 and resp.json()["text"] == "a b c "  # nothing partial leaks


def test_a_stream_cut_after_output_ends_with_a_retryable_error_event(two_workers) -> None:  # type: ignore[no-untyped-def]
    client, first, second, tenant = two_workers
    first.fail_after = second.fail_after = 1
    resp = client.post("/generate", headers=tenant, json={"prompt": "a b c", "stream": True})
    assert resp.status_code == 200
    events = [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[0] == {"type": "token", "text": "a "}
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "worker_unavailable"


def test_local_workers_get_a_gpu_each_when_there_are_gpus(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from app.workers.supervisor import device_for, visible_gpu_count

    assert [device_for("auto", i, 2) for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert device_for("auto", 1, 0) == "auto" and device_for("cpu", 1, 4) == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert visible_gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpu_count() == 0
