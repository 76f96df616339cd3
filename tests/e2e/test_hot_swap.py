"""New versions and a delete while requests stream in: nobody fails, every answer is one version's."""

from __future__ import annotations

import hashlib
import json
import threading
import time

from tests.e2e.conftest import Server
from tests.e2e.test_user_path import fixture_files

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
EXPECTED = {1: "The answer is 42", 2: "Meow", 3: "The answer is 42"}  # the fixture each version was made from


def answered_with(results: list[tuple[float, int, dict]], version: int) -> None:  # type: ignore[type-arg]
    """Wait until the traffic has an answer from `version` (fixed sleeps lost one on a loaded CI machine)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(status == 200 and body["adapter_version"] == version for _, status, body in list(results)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no answer from version {version} within 60 s: {results[-3:]}")


def test_versions_swap_under_traffic_and_a_delete_drains(server: Server) -> None:
    key = server.new_tenant("swapper")
    results: list[tuple[float, int, dict]] = []  # type: ignore[type-arg]
    stop = threading.Event()
    keys: set[str] = set()

    def traffic() -> None:
        with server.client(key) as client:
            while not stop.is_set():
                response = client.post("/generate", json={"messages": QUESTION, "adapter": "swap", "max_tokens": 8})
                results.append((time.monotonic(), response.status_code, response.json()))

    with server.client(key) as client:
        def upload(fixture: str) -> int:
            # A config field of our own gives these uploads worker cache keys no other test shares.
            (_, (_, config)), (_, (_, weights)) = fixture_files(fixture)
            config = json.dumps({**json.loads(config), "revision": "hot-swap-test"}).encode()
            keys.add(f"{hashlib.sha256(weights).hexdigest()[:32]}-{hashlib.sha256(config).hexdigest()[:16]}")
            files = [("files", ("adapter_config.json", config)), ("files", ("adapter_model.safetensors", weights))]
            response = client.post("/adapters", data={"name": "swap"}, files=files)
            assert response.status_code == 201, response.text
            return int(response.json()["version"])

        assert upload("answer42") == 1
        threads = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            answered_with(results, 1)
            assert upload("meow") == 2
            answered_with(results, 2)
            assert upload("answer42") == 3
            answered_with(results, 3)
            deleted_at = time.monotonic()
            assert client.delete("/adapters/swap").status_code == 204
            # Until a request that started after the delete has its answer (seconds on a loaded machine).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and sum(1 for when, _, _ in results if when >= deleted_at) < 4:
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(60)

    answered = [(when, body) for when, status, body in results if status == 200]
    for _, body in answered:
        assert body["text"].startswith(EXPECTED[body["adapter_version"]]), body
    assert {body["adapter_version"] for _, body in answered} == {1, 2, 3}  # the traffic saw every version
    refused = [(when, status) for when, status, _ in results if status != 200]
    assert all(status == 404 and when >= deleted_at for when, status in refused), refused
    assert refused, "requests after the delete must be refused"

    deadline = time.monotonic() + 5  # the worker lets go of deleted adapters once their requests end
    with server.client(server.admin_key) as admin:
        while keys & set(admin.get("/admin/workers").json()[0]["adapters_resident"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not keys & set(admin.get("/admin/workers").json()[0]["adapters_resident"])
