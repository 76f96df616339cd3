"""A fleet on one machine: PostgreSQL, Redis, two workers started by hand with the worker token,
and two gateways with no workers of their own (`--workers 0`) that reach both by URL.

A tenant's concurrency limit holds across both gateways together; the workers refuse calls
without the token; both gateways send an adapter to the same worker; a gateway killed
mid-stream gives its slot back once its lease expires; and an activation from one gateway
rolls both workers while both gateways serve traffic, with no failed request.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import REDIS_URL, ROOT, fresh_postgres_database, redis_answers
from tests.e2e.conftest import Server, free_port, running_server
from tests.e2e.test_user_path import fixture_files

LEASE_S = 3

pytestmark = pytest.mark.skipif(not redis_answers(), reason="no Redis on 127.0.0.1:6379 (.ci/redis.sh starts one)")


@dataclass
class Fleet:
    a: Server
    b: Server
    worker_urls: list[str]
    token: str
    gateway_settings: dict[str, str]  # what a third gateway needs to join


def _start_worker(prepared_model, port: int, blobs: Path, token: str, log: Path) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    """`loraplex worker`, started by hand as on another machine: its token by environment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAPLEX_WORKER_TOKEN": token}
    argv = [sys.executable, "-m", "app.cli", "worker", "--model-path", str(prepared_model.path),
            "--model-name", prepared_model.name, "--blob-url", str(blobs), "--host", "127.0.0.1",
            "--port", str(port), "--threads", "1"]
    with log.open("wb") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_worker(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"worker at {url} not ready"
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)


@pytest.fixture(scope="module")
def fleet(prepared_model, tmp_path_factory) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    token, prefix = secrets.token_urlsafe(32), f"loraplex-e2e:{uuid.uuid4().hex}:"
    shared_dir = tmp_path_factory.mktemp("fleet-shared")
    blobs = shared_dir / "blobs"
    with fresh_postgres_database() as database_url:
        # The base model is registered once, in the shared database (as `models prepare` does in deploy/).
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAPLEX_DATABASE_URL": database_url,
               "LORAPLEX_MODELS_DIR": str(prepared_model.path.parent), "LORAPLEX_DATA_DIR": str(shared_dir)}
        subprocess.run([sys.executable, "-m", "app.cli", "models", "prepare"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
        ports = [free_port(), free_port()]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        logs = [shared_dir / f"worker-{i}.log" for i in range(2)]
        workers = [_start_worker(prepared_model, p, blobs, token, log) for p, log in zip(ports, logs, strict=True)]
        try:
            for url, proc, log in zip(urls, workers, logs, strict=True):
                _wait_worker(url, proc, log)
            settings = {"workers": "0", "worker_urls": json.dumps(urls), "worker_token": token,
                        "database_url": database_url, "blob_url": str(blobs), "redis_url": REDIS_URL,
                        "redis_prefix": prefix, "redis_lease_s": str(LEASE_S), "job_runner": "false"}
            dir_a, dir_b = tmp_path_factory.mktemp("fleet-a"), tmp_path_factory.mktemp("fleet-b")
            admin_key = "lpx_admin_" + secrets.token_urlsafe(24)  # one admin for the fleet
            for d in (dir_a, dir_b):
                (d / "admin_key").write_text(admin_key + "\n")
            with running_server(prepared_model.path.parent, dir_a, **settings) as a, \
                    running_server(prepared_model.path.parent, dir_b, **settings) as b:
                for gateway in (a, b):
                    _wait_routable(gateway, 2)
                yield Fleet(a, b, urls, token, settings)
        finally:
            for proc in workers:
                proc.terminate()
                proc.wait(30)
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def _wait_routable(server: Server, ready: int) -> None:
    deadline = time.monotonic() + 60
    with server.client(server.admin_key) as admin:
        while sum(w["ready"] for w in admin.get("/admin/workers").json()) < ready:
            assert time.monotonic() < deadline, "the gateway never saw its workers ready"
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
        assert on_b.post("/generate", json=SHORT).status_code == 200
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


def test_the_workers_answer_only_with_the_token(fleet: Fleet) -> None:
    for url in fleet.worker_urls:
        with httpx.Client(base_url=url, timeout=10) as direct:
            assert direct.post("/generate", json={"request_id": "x", "prompt": "hi"}).status_code == 401
            assert direct.get("/health").status_code == 401
            authorized = direct.get("/health", headers={"authorization": f"Bearer {fleet.token}"})
            assert authorized.status_code == 200 and authorized.json()["ready"]


def test_both_gateways_send_an_adapter_to_the_same_worker(fleet: Fleet) -> None:
    key = fleet.a.new_tenant("routed")
    with fleet.a.client(key) as on_a, fleet.b.client(key) as on_b:
        assert on_a.post("/adapters", data={"name": "forty-two"}, files=fixture_files("answer42")).status_code == 201
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "adapter": "forty-two"}
        answers = [client.post("/generate", json=body) for client in (on_a, on_b, on_a, on_b)]
    assert all(r.status_code == 200 and "42" in r.json()["text"] for r in answers)
    assert len({r.headers["X-Loraplex-Worker"] for r in answers}) == 1  # one worker holds it, for both


def test_a_gateway_killed_mid_stream_frees_its_slot_after_its_lease(prepared_model, tmp_path_factory,  # type: ignore[no-untyped-def]
                                                                     fleet: Fleet) -> None:
    key = _limited_tenant(fleet, "orphaned")
    dir_c = tmp_path_factory.mktemp("fleet-c")
    (dir_c / "admin_key").write_text(fleet.a.admin_key + "\n")
    with running_server(prepared_model.path.parent, dir_c, **fleet.gateway_settings) as c:
        _wait_routable(c, 2)
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


def test_an_activation_rolls_both_workers_while_both_gateways_serve(fleet: Fleet) -> None:
    key = fleet.a.new_tenant("through-the-roll")
    results: list[int] = []
    stop = threading.Event()

    def traffic(gateway: Server) -> None:
        with gateway.client(key) as client:
            while not stop.is_set():
                results.append(client.post("/generate", json=SHORT).status_code)

    with fleet.b.client(fleet.b.admin_key, timeout=600) as admin:
        active = next(m for m in admin.get("/admin/base-models").json() if m["active"])
        senders = [threading.Thread(target=traffic, args=(g,)) for g in (fleet.a, fleet.b)]
        for t in senders:
            t.start()
        time.sleep(1.0)
        rolled = admin.post(f"/admin/base-models/{active['id']}/activate")
        stop.set()
        for t in senders:
            t.join(60)
        assert rolled.status_code == 200, rolled.text
        assert rolled.json()["moved_workers"] == ["remote-0", "remote-1"] and rolled.json()["not_moved_workers"] == []
        workers = admin.get("/admin/workers").json()
    assert all(w["ready"] and w["model"] == active["name"] for w in workers)
    assert len(results) > 3 and set(results) == {200}, results  # gateway A failed over while B moved them
