"""Two gateways, one database, one Redis and a worker reached by URL with the worker token.

Gateway A runs the worker; gateway B has none of its own (`--workers 0`) and reaches A's worker
by URL, as a second gateway replica would. A tenant's concurrency limit holds across both
together, and a gateway killed mid-stream gives its slot back once its lease expires.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import redis

from tests.e2e.conftest import Server, running_server

REDIS_URL = "redis://127.0.0.1:6379/0"
LEASE_S = 3


def _redis_answers() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


pytestmark = pytest.mark.skipif(not _redis_answers(), reason="no Redis on 127.0.0.1:6379 (.ci/redis.sh starts one)")


@dataclass
class Fleet:
    a: Server
    b: Server
    worker_url: str
    token: str
    prefix: str  # of the fleet's keys in Redis


@pytest.fixture(scope="module")
def fleet(prepared_model, tmp_path_factory) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    token, prefix = secrets.token_urlsafe(32), f"loraplex-e2e:{uuid.uuid4().hex}:"
    shared = {"worker_token": token, "redis_url": REDIS_URL, "redis_prefix": prefix,
              "redis_lease_s": str(LEASE_S), "job_runner": "false"}
    dir_a, dir_b = tmp_path_factory.mktemp("fleet-a"), tmp_path_factory.mktemp("fleet-b")
    with running_server(prepared_model.path.parent, dir_a, **shared) as a:
        with a.client(a.admin_key) as admin:
            worker_url = admin.get("/admin/workers").json()[0]["url"]
        (dir_b / "admin_key").write_text(a.admin_key + "\n")  # one admin for the fleet
        with running_server(prepared_model.path.parent, dir_b, workers="0", worker_urls=json.dumps([worker_url]),
                            database_url=f"sqlite:///{dir_a / 'loraplex.db'}", blob_url=str(dir_a / "blobs"),
                            **shared) as b:
            _wait_routable(b)
            yield Fleet(a, b, worker_url, token, prefix)
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def _wait_routable(server: Server) -> None:
    deadline = time.monotonic() + 60
    with server.client(server.admin_key) as admin:
        while not any(w["ready"] for w in admin.get("/admin/workers").json()):
            assert time.monotonic() < deadline, "gateway B never saw the remote worker ready"
            time.sleep(0.5)


def _limited_tenant(fleet: Fleet, name: str) -> str:
    key = fleet.a.new_tenant(name)
    with fleet.a.client(fleet.a.admin_key) as admin:
        tenant_id = next(t["id"] for t in admin.get("/admin/tenants").json() if t["name"] == name)
        answer = admin.put(f"/admin/tenants/{tenant_id}/limits", json={"max_concurrent_requests": 1})
        assert answer.status_code == 200, answer.text
    return key


# min_tokens: no EOS before the 200th token, so the stream is surely still running when looked at
LONG = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 200,
        "min_tokens": 200, "stream": True}
SHORT = {"prompt": "Hi", "max_tokens": 2}


def test_a_tenants_concurrency_limit_holds_across_both_gateways(fleet: Fleet) -> None:
    key = _limited_tenant(fleet, "across")
    with fleet.a.client(key) as on_a, fleet.b.client(key) as on_b:
        assert on_b.post("/generate", json=SHORT).status_code == 200  # B serves through the remote worker
        with on_a.stream("POST", "/generate", json=LONG) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()  # kept: a dropped iterator closes the stream, which ends the request
            next(lines)  # A's request is running
            refused = on_b.post("/generate", json=SHORT)
            assert refused.status_code == 429 and "max_concurrent_requests" in refused.json()["error"]["message"]
        deadline = time.monotonic() + 10  # A's slot is released when its stream closes
        while (answer := on_b.post("/generate", json=SHORT)).status_code == 429:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert answer.status_code == 200


def test_the_shared_worker_answers_only_with_the_token(fleet: Fleet) -> None:
    with httpx.Client(base_url=fleet.worker_url, timeout=10) as direct:
        assert direct.post("/generate", json={"request_id": "x", "prompt": "hi"}).status_code == 401
        authorized = direct.get("/health", headers={"authorization": f"Bearer {fleet.token}"})
        assert authorized.status_code == 200 and authorized.json()["ready"]


def test_a_gateway_killed_mid_stream_frees_its_slot_after_its_lease(prepared_model, tmp_path_factory,  # type: ignore[no-untyped-def]
                                                                     fleet: Fleet) -> None:
    key = _limited_tenant(fleet, "orphaned")
    dir_c = tmp_path_factory.mktemp("fleet-c")
    (dir_c / "admin_key").write_text(fleet.a.admin_key + "\n")
    shared = {"worker_token": fleet.token, "redis_url": REDIS_URL, "redis_lease_s": str(LEASE_S),
              "job_runner": "false", "workers": "0", "worker_urls": json.dumps([fleet.worker_url]),
              "database_url": f"sqlite:///{fleet.a.data_dir / 'loraplex.db'}",
              "blob_url": str(fleet.a.data_dir / "blobs")}
    with running_server(prepared_model.path.parent, dir_c, redis_prefix=fleet.prefix, **shared) as c:
        _wait_routable(c)
        with c.client(key) as on_c, fleet.a.client(key) as on_a:
            with on_c.stream("POST", "/generate", json=LONG) as stream:
                assert stream.status_code == 200
                lines = stream.iter_lines()  # kept: a dropped iterator closes the stream
                next(lines)
                assert on_a.post("/generate", json=SHORT).status_code == 429
                os.killpg(c.proc.pid, signal.SIGKILL)  # gateway C dies: no release, no renewal
                killed = time.monotonic()
            deadline = killed + LEASE_S + 10
            while (answer := on_a.post("/generate", json=SHORT)).status_code == 429:
                assert time.monotonic() < deadline, answer.text
                time.sleep(0.3)
            assert answer.status_code == 200 and time.monotonic() - killed >= LEASE_S - 1  # the lease ran out



def test_activation_from_a_gateway_with_no_workers_of_its_own_rolls_the_remote_workers_under_traffic(
        prepared_model, tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    """Gateway A runs two workers; gateway B reaches both by URL and activates the base: B moves them
    one at a time through their reload API, and B's traffic meanwhile never fails."""
    token = secrets.token_urlsafe(32)
    dir_a, dir_b = tmp_path_factory.mktemp("roll-a"), tmp_path_factory.mktemp("roll-b")
    with running_server(prepared_model.path.parent, dir_a, workers="2", worker_threads="1", worker_token=token,
                        job_runner="false") as a:
        with a.client(a.admin_key) as admin:
            urls = [w["url"] for w in admin.get("/admin/workers").json()]
        (dir_b / "admin_key").write_text(a.admin_key + "\n")
        with running_server(prepared_model.path.parent, dir_b, workers="0", worker_urls=json.dumps(urls),
                            worker_token=token, database_url=f"sqlite:///{dir_a / 'loraplex.db'}",
                            blob_url=str(dir_a / "blobs"), job_runner="false") as b:
            _wait_routable(b)
            key = b.new_tenant("through-the-remote-roll")
            results: list[int] = []
            stop = threading.Event()

            def traffic() -> None:
                with b.client(key) as client:
                    while not stop.is_set():
                        results.append(client.post("/generate", json=SHORT).status_code)

            with b.client(b.admin_key, timeout=600) as admin:
                active = next(m for m in admin.get("/admin/base-models").json() if m["active"])
                runner = threading.Thread(target=traffic)
                runner.start()
                time.sleep(1.0)
                rolled = admin.post(f"/admin/base-models/{active['id']}/activate")
                stop.set()
                runner.join(60)
                assert rolled.status_code == 200, rolled.text
                assert rolled.json()["moved_workers"] == ["remote-0", "remote-1"]
                assert rolled.json()["not_moved_workers"] == []
                workers = admin.get("/admin/workers").json()
            assert all(w["ready"] and w["model"] == active["name"] for w in workers)
            assert len(results) > 3 and set(results) == {200}, results
