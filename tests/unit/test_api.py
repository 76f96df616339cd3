"""The gateway's HTTP API over a fake worker: auth, adapters, generation, errors."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timedelta

from tests.factory import TINY_BASE, adapter_files, zip_of
from tests.unit.conftest import Gateway

QV = {k: v for k, v in TINY_BASE.items() if k.endswith(("q_proj", "v_proj"))}


def upload(gw: Gateway, headers: dict[str, str], name: str, seed: int = 0, **kw):  # type: ignore[no-untyped-def]
    config, weights = adapter_files(QV, seed=seed, **kw)
    return gw.client.post(
        "/adapters", headers=headers, data={"name": name},
        files=[("files", ("adapter_config.json", config)), ("files", ("adapter_model.safetensors", weights))],
    )


def test_health_and_metrics_need_no_key(gateway: Gateway) -> None:
    assert gateway.client.get("/health/live").json() == {"status": "ok"}
    assert gateway.client.get("/health/ready").status_code == 200
    assert "loraplex_http_requests_total" in gateway.client.get("/metrics").text


def test_missing_bad_and_revoked_keys_get_401(gateway: Gateway) -> None:
    assert gateway.client.get("/adapters").status_code == 401
    resp = gateway.client.get("/adapters", headers={"Authorization": "Bearer nope"})
    assert resp.status_code == 401
    assert resp.json()["error"]["type"] == "unauthorized"
    tenant = gateway.new_tenant("acme")
    key = gateway.client.post("/admin/tenants/1/keys", headers=gateway.admin()).json()
    extra = {"Authorization": f"Bearer {key['api_key']}"}
    assert gateway.client.get("/adapters", headers=extra).status_code == 200
    assert gateway.client.delete(f"/admin/keys/{key['key_id']}", headers=gateway.admin()).status_code == 204
    assert gateway.client.get("/adapters", headers=extra).status_code == 401
    assert gateway.client.get("/adapters", headers=tenant).status_code == 200  # the first key still works


def test_tenant_key_on_admin_route_is_403(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    resp = gateway.client.post("/admin/tenants", json={"name": "evil"}, headers=tenant)
    assert resp.status_code == 403
    assert gateway.client.get("/admin/workers", headers=tenant).status_code == 403


def test_duplicate_tenant_is_409(gateway: Gateway) -> None:
    gateway.new_tenant("acme")
    resp = gateway.client.post("/admin/tenants", json={"name": "acme"}, headers=gateway.admin())
    assert resp.status_code == 409


def test_upload_list_show_generate_delete(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    resp = upload(gateway, tenant, "support")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["name"] == "support" and body["version"] == 1 and body["rank"] == 4
    assert body["target_modules"] == ["q_proj", "v_proj"] and len(body["sha256"]) == 64
    assert body["warnings"]  # the declared base differs from "tiny-base": reported, not refused
    assert datetime.fromisoformat(body["created_at"]).utcoffset() == timedelta(0)  # explicit UTC

    listed = gateway.client.get("/adapters", headers=tenant).json()
    assert [a["name"] for a in listed] == ["support"]
    assert gateway.client.get("/adapters/support", headers=tenant).json()["latest_version"] == 1

    resp = gateway.client.post("/generate", headers=tenant,
                               json={"prompt": "hello there", "adapter": "support", "max_tokens": 8})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["adapter"] == "support" and out["adapter_version"] == 1
    assert out["usage"]["completion_tokens"] == 3 and out["usage"]["total_tokens"] == 6
    sent = gateway.worker.requests[-1]
    assert sent.adapter is not None and out["text"].startswith(f"[{sent.adapter.key}]")

    assert gateway.client.delete("/adapters/support", headers=tenant).status_code == 204
    assert gateway.worker.evicted == [sent.adapter.key]
    resp = gateway.client.post("/generate", headers=tenant, json={"prompt": "hi", "adapter": "support"})
    assert resp.status_code == 404, resp.text
    assert "support" in resp.json()["error"]["message"]


def test_archive_upload_and_new_version(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    upload(gateway, tenant, "support", seed=1)
    config, weights = adapter_files(QV, seed=2)
    archive = zip_of({"adapter_config.json": config, "adapter_model.safetensors": weights})
    resp = gateway.client.post("/adapters", headers=tenant, data={"name": "support"},
                               files=[("files", ("support.zip", archive))])
    assert resp.status_code == 201, resp.text
    assert resp.json()["version"] == 2
    gateway.client.post("/generate", headers=tenant, json={"prompt": "x", "adapter": "support@1"})
    pinned = gateway.worker.requests[-1].adapter
    gateway.client.post("/generate", headers=tenant, json={"prompt": "x", "adapter": "support"})
    latest = gateway.worker.requests[-1].adapter
    assert pinned is not None and latest is not None and pinned.key != latest.key


def test_cross_tenant_adapters_are_unknown(gateway: Gateway) -> None:
    alice, bob = gateway.new_tenant("alice"), gateway.new_tenant("bob")
    upload(gateway, alice, "private")
    assert gateway.client.get("/adapters", headers=bob).json() == []
    assert gateway.client.get("/adapters/private", headers=bob).status_code == 404
    assert gateway.client.delete("/adapters/private", headers=bob).status_code == 404
    resp = gateway.client.post("/generate", headers=bob, json={"prompt": "x", "adapter": "private"})
    assert resp.status_code == 404
    assert gateway.client.get("/adapters/private", headers=alice).status_code == 200


def test_bad_uploads_are_4xx_and_store_nothing(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    config, _ = adapter_files(QV)
    resp = gateway.client.post("/adapters", headers=tenant, data={"name": "p"},
                               files=[("files", ("adapter_config.json", config)),
                                      ("files", ("adapter_model.bin", b"\x80\x04pickle"))])
    assert resp.status_code == 422 and "pickle" in resp.json()["error"]["message"]
    resp = upload(gateway, tenant, "huge-rank", rank=16)
    assert resp.status_code == 422 and "max_lora_rank" in resp.json()["error"]["message"]
    resp = upload(gateway, tenant, "../escape")
    assert resp.status_code == 400
    resp = gateway.client.post("/adapters", headers=tenant, data={"name": "huge"},
                               files=[("files", ("adapter_model.safetensors", b"\0" * 300_000))])
    assert resp.status_code == 413 and "max_adapter_bytes" in resp.json()["error"]["message"]
    names = [a["name"] for a in gateway.client.get("/adapters", headers=tenant).json()]
    assert "p" not in names and "huge-rank" not in names and "huge" not in names


def test_generation_limits_name_the_limit(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    cases = [
        ({"prompt": "x", "max_tokens": 65}, "max_tokens 65 is above the limit of 64"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
        ({}, "exactly one"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop"),
        ({"prompt": "x", "temperature": 3}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "unknown_field": 1}, "unknown_field"),
    ]
    for body, message in cases:
        resp = gateway.client.post("/generate", headers=tenant, json=body)
        assert 400 <= resp.status_code < 500, body
        assert message in resp.json()["error"]["message"], (body, resp.json())
    assert gateway.worker.requests == []


def test_sampling_params_and_messages_reach_the_worker(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    resp = gateway.client.post("/generate", headers=tenant, json={
        "messages": [{"role": "user", "content": "hi you"}], "temperature": 0.7, "top_p": 0.9,
        "seed": 7, "stop": "END", "max_tokens": 5})
    assert resp.status_code == 200
    sent = gateway.worker.requests[-1]
    assert sent.messages is not None and sent.messages[0].content == "hi you"
    s = sent.sampling
    assert (s.temperature, s.top_p, s.seed, s.stop, s.max_tokens) == (0.7, 0.9, 7, ["END"], 5)


def test_streaming_sends_token_events_then_done(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    with gateway.client.stream("POST", "/generate", headers=tenant,
                               json={"prompt": "one two three", "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert [e["text"] for e in events if e["type"] == "token"] == ["one ", "two ", "three "]
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 3


def test_no_ready_worker_is_503_with_retry_after(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    gateway.worker.ready = False
    gateway.client.app.state.services.pool.slots[0].health.ready = False  # type: ignore[attr-defined]
    resp = gateway.client.post("/generate", headers=tenant, json={"prompt": "x"})
    assert resp.status_code == 503
    assert "Retry-After" in resp.headers
    assert gateway.client.get("/health/ready").status_code == 503


def test_deleting_one_version_keeps_the_others(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    upload(gateway, tenant, "support", seed=1)
    upload(gateway, tenant, "support", seed=2)
    assert gateway.client.delete("/adapters/support@2", headers=tenant).status_code == 204
    shown = gateway.client.get("/adapters/support", headers=tenant).json()
    assert [v["version"] for v in shown["versions"]] == [1] and shown["latest_version"] == 1
    assert gateway.client.delete("/adapters/support@2", headers=tenant).status_code == 404
    assert len(gateway.worker.evicted) == 1  # workers were told to free that version
    resp = gateway.client.post("/generate", headers=tenant, json={"prompt": "hi", "adapter": "support@2"})
    assert resp.status_code == 404


def test_a_version_deleted_before_the_worker_loads_it_is_404(gateway: Gateway) -> None:
    """The request resolved its version, then the adapter was deleted and its blob went with it."""
    from adapters.registry import AdapterNotFound

    tenant = gateway.new_tenant("acme")
    registry = gateway.client.app.state.services.registry  # type: ignore[attr-defined]
    tenant_id = next(t["id"] for t in gateway.client.get("/admin/tenants", headers=gateway.admin()).json()
                     if t["name"] == "acme")
    upload(gateway, tenant, "other", seed=2)

    def delete_then_fail(_request):  # type: ignore[no-untyped-def]
        with contextlib.suppress(AdapterNotFound):
            registry.delete(tenant_id, "support")
        return "adapter could not be loaded: blob not found"

    gateway.worker.on_request = delete_then_fail
    for stream in (False, True):
        assert upload(gateway, tenant, "support", seed=1).status_code == 201
        resp = gateway.client.post("/generate", headers=tenant,
                                   json={"prompt": "hi", "adapter": "support", "stream": stream})
        body = json.loads(resp.text.strip().split("data: ")[-1]) if stream else resp.json()
        assert resp.status_code == (200 if stream else 404) and body["error"]["type"] == "not_found", resp.text
        # Each upload after the delete is a new version: numbers are never given out twice.
        assert f"'support@{1 + stream}' was deleted while the request waited" in body["error"]["message"]
    # The same failure for an adapter that still exists stays a failure.
    resp = gateway.client.post("/generate", headers=tenant, json={"prompt": "hi", "adapter": "other"})
    # The worker's detail stays in the log; the client gets a request id to quote.
    message = resp.json()["error"]["message"]
    assert resp.status_code == 500 and "request id" in message and "blob" not in message, message


def test_a_chunked_upload_over_the_limit_is_refused(gateway: Gateway) -> None:
    """No Content-Length to check up front: the body is counted as it arrives (the e2e test shows
    the refusal comes while it streams; this in-process client sends everything first)."""
    tenant = gateway.new_tenant("acme")

    def body():  # type: ignore[no-untyped-def]
        yield b'--xyz\r\nContent-Disposition: form-data; name="name"\r\n\r\nhuge\r\n'
        yield b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n\r\n'
        for _ in range(3):
            yield b"\0" * (1024 * 1024)
        yield b"\r\n--xyz--\r\n"

    headers = {**tenant, "content-type": "multipart/form-data; boundary=xyz"}
    resp = gateway.client.post("/adapters", headers=headers, content=body())
    assert resp.status_code == 413 and "max_adapter_bytes" in resp.json()["error"]["message"]
    assert gateway.client.get("/adapters", headers=tenant).json() == []


def test_an_unexpected_failure_is_a_json_500_without_internals(gateway: Gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    tenant = gateway.new_tenant("acme")
    services = gateway.client.app.state.services  # type: ignore[attr-defined]
    monkeypatch.setattr(services.registry, "list_adapters", lambda _: 1 / 0)
    resp = TestClient(gateway.client.app, raise_server_exceptions=False).get("/adapters", headers=tenant)  # type: ignore[arg-type]
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "internal_error"
    assert "request id" in resp.json()["error"]["message"]  # to quote to the operators, who find it in the log
    assert "ZeroDivision" not in resp.text
