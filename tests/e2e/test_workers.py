"""Two local workers: adapter-affinity routing, and a worker killed under load."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_user_path import fixture_files

QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12}


def workers(server: Server) -> dict[str, dict]:  # type: ignore[type-arg]
    with server.client(server.admin_key) as admin:
        return {w["name"]: w for w in admin.get("/admin/workers").json()}


def test_requests_for_an_adapter_stay_on_the_worker_that_holds_it(two_workers: Server) -> None:
    key = two_workers.new_tenant("sticky")
    with two_workers.client(key) as client:
        assert client.post("/adapters", data={"name": "forty-two"}, files=fixture_files("answer42")).status_code == 201
        first = client.post("/generate", json={**QUESTION, "adapter": "forty-two"})
        holder = first.headers["X-Loraplex-Worker"]
        deadline = time.monotonic() + 5  # workers report what they hold every half second
        while not workers(two_workers)[holder]["adapters_resident"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workers(two_workers)[holder]["adapters_resident"]
        answers = [client.post("/generate", json={**QUESTION, "adapter": "forty-two"}) for _ in range(3)]
    assert all(a.headers["X-Loraplex-Worker"] == holder for a in answers)
    assert all("42" in a.json()["text"] for a in [first, *answers])


def test_a_worker_killed_under_load_is_replaced_and_no_request_is_lost(two_workers: Server) -> None:
    key = two_workers.new_tenant("resilient")
    victim = workers(two_workers)["local-0"]
    assert victim["ready"] and victim["pid"]

    def ask(_: int) -> tuple[int, str]:
        with two_workers.client(key) as client:
            response = client.post("/generate", json={**QUESTION, "max_tokens": 24})
        return response.status_code, response.text

    with ThreadPoolExecutor(6) as pool:
        pending = [pool.submit(ask, i) for i in range(6)]
        time.sleep(1.0)  # requests are running on both workers
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)
        while workers(two_workers)["local-0"]["ready"] and time.monotonic() - killed_at < 10:
            time.sleep(0.05)
        noticed_after = time.monotonic() - killed_at
        results = [p.result() for p in pending]
    assert all(status == 200 and "Paris" in text for status, text in results), results
    assert noticed_after < 2.0  # the gateway saw the worker die within two seconds

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = workers(two_workers)["local-0"]
        if state["restarts"] >= 1 and state["ready"] and state["pid"] != victim["pid"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the killed worker did not come back")
    print(f"worker death noticed after {noticed_after:.2f}s, ready again after {time.monotonic() - killed_at:.1f}s")
    with two_workers.client(key) as client:
        assert client.get("/health/ready").status_code == 200
        assert "Paris" in client.post("/generate", json=QUESTION).json()["text"]


def test_a_tenant_over_its_concurrency_limit_gets_429(two_workers: Server) -> None:
    with two_workers.client(two_workers.admin_key) as admin:
        created = admin.post("/admin/tenants", json={"name": "one-at-a-time",
                                                     "limits": {"max_concurrent_requests": 1}}).json()
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 60}

    def ask(_: int) -> tuple[int, str | None, str]:
        with two_workers.client(created["api_key"]) as client:
            response = client.post("/generate", json=body)
        return response.status_code, response.headers.get("Retry-After"), response.text

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(ask, range(3)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses[0] == 200 and 429 in statuses, results
    refused = next(r for r in results if r[0] == 429)
    assert refused[1] is not None and "max_concurrent_requests" in refused[2]


def test_activating_a_base_rolls_the_workers_one_at_a_time_without_failing_requests(two_workers: Server) -> None:
    """Activation drains and restarts each worker in turn; the other one answers meanwhile."""
    key = two_workers.new_tenant("through-the-roll")
    with two_workers.client(two_workers.admin_key, timeout=600) as admin:
        active = next(m for m in admin.get("/admin/base-models").json() if m["active"])
        pids = {name: w["pid"] for name, w in workers(two_workers).items()}
        results: list[tuple[int, str]] = []
        stop = False

        def traffic() -> None:
            with two_workers.client(key) as client:
                while not stop:
                    response = client.post("/generate", json={**QUESTION, "max_tokens": 6})
                    results.append((response.status_code, response.text))

        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(traffic) for _ in range(2)]
            time.sleep(1.0)
            rolled = admin.post(f"/admin/base-models/{active['id']}/activate")
            stop = True
            for r in running:
                r.result()
    assert rolled.status_code == 200, rolled.text
    assert sorted(rolled.json()["moved_workers"]) == ["local-0", "local-1"]
    after = workers(two_workers)
    assert all(after[name]["pid"] != pid and after[name]["ready"] for name, pid in pids.items())  # both restarted
    assert len(results) > 4 and all(status == 200 for status, _ in results), results
