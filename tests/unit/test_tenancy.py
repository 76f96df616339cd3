"""Keys, tenants, sharing and version numbers as tenants and operators use them through the API."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.unit.conftest import Gateway
from tests.unit.test_api import upload


def _create(gateway: Gateway, name: str) -> tuple[int, int, dict[str, str]]:
    resp = gateway.client.post("/admin/tenants", json={"name": name}, headers=gateway.admin())
    assert resp.status_code == 201, resp.text
    body = resp.json()
    return body["id"], body["key_id"], {"Authorization": f"Bearer {body['api_key']}"}


def test_a_tenants_first_key_can_be_listed_and_revoked(gateway: Gateway) -> None:
    tenant_id, key_id, key = _create(gateway, "acme")
    listed = gateway.client.get(f"/admin/tenants/{tenant_id}/keys", headers=gateway.admin()).json()
    assert [k["key_id"] for k in listed] == [key_id] and key["Authorization"][7:].startswith(listed[0]["prefix"])
    assert gateway.client.get("/adapters", headers=key).status_code == 200
    assert gateway.client.get(f"/admin/tenants/{tenant_id}/keys", headers=gateway.admin()).json()[0]["last_used_at"]
    assert gateway.client.delete(f"/admin/keys/{key_id}", headers=gateway.admin()).status_code == 204
    assert gateway.client.get("/adapters", headers=key).status_code == 401


def test_a_tenant_rotates_its_own_keys_and_cannot_touch_anothers(gateway: Gateway) -> None:
    _, old_id, old = _create(gateway, "acme")
    _, other_id, _ = _create(gateway, "other")
    assert gateway.client.delete(f"/keys/{old_id}", headers=old).status_code == 409  # its only key
    new = gateway.client.post("/keys", headers=old).json()
    fresh = {"Authorization": f"Bearer {new['api_key']}"}
    assert {k["key_id"] for k in gateway.client.get("/keys", headers=fresh).json()} == {old_id, new["key_id"]}
    assert gateway.client.delete(f"/keys/{other_id}", headers=fresh).status_code == 404
    assert gateway.client.delete(f"/keys/{old_id}", headers=fresh).status_code == 204
    assert gateway.client.get("/adapters", headers=old).status_code == 401
    assert gateway.client.get("/adapters", headers=fresh).status_code == 200
    assert "api_key" not in gateway.client.get("/keys", headers=fresh).json()[0]


def test_a_suspended_tenant_is_refused_and_keeps_everything(gateway: Gateway) -> None:
    tenant_id, _, key = _create(gateway, "acme")
    assert upload(gateway, key, "support").status_code == 201
    resp = gateway.client.post(f"/admin/tenants/{tenant_id}/suspend", headers=gateway.admin())
    assert resp.status_code == 200 and resp.json()["suspended"] is True
    for call in (lambda: gateway.client.get("/adapters", headers=key),
                 lambda: gateway.client.post("/generate", headers=key, json={"prompt": "hi"})):
        refused = call()
        assert refused.status_code == 403 and "suspended" in refused.json()["error"]["message"]
    gateway.client.post(f"/admin/tenants/{tenant_id}/resume", headers=gateway.admin())
    assert [a["name"] for a in gateway.client.get("/adapters", headers=key).json()] == ["support"]


def test_deleting_a_tenant_removes_its_keys_adapters_and_unshared_blobs(gateway: Gateway) -> None:
    tenant_id, _, key = _create(gateway, "leaving")
    _, _, stays = _create(gateway, "staying")
    mine = upload(gateway, key, "mine", seed=1).json()
    shared = upload(gateway, key, "same", seed=2).json()
    assert upload(gateway, stays, "copy", seed=2).status_code == 201  # identical content, another tenant
    assert gateway.client.delete(f"/admin/tenants/{tenant_id}", headers=gateway.admin()).status_code == 204
    assert gateway.client.get("/adapters", headers=key).status_code == 401
    assert gateway.client.get(f"/admin/tenants/{tenant_id}", headers=gateway.admin()).status_code == 404
    blobs = {p.name for p in gateway.settings.blob_dir.rglob("sha256/*/*")}
    assert mine["sha256"] not in blobs and shared["sha256"] in blobs
    assert len(gateway.worker.evicted) == 2  # both versions dropped from the workers
    resp = gateway.client.post("/generate", headers=stays, json={"prompt": "hi", "adapter": "copy"})
    assert resp.status_code == 200


def test_sharing_is_per_version_so_the_owner_cannot_swap_weights_under_consumers(gateway: Gateway) -> None:
    owner_id, _, owner = _create(gateway, "owner")
    _, _, user = _create(gateway, "user")
    first = upload(gateway, owner, "shared", seed=1).json()
    resp = gateway.client.put(f"/admin/tenants/{owner_id}/adapters/shared/visibility", headers=gateway.admin(),
                              json={"public": True})
    assert resp.json()["public_versions"] == [1]
    assert upload(gateway, owner, "shared", seed=2).status_code == 201  # version 2, private

    def used_by(headers: dict[str, str], ref: str) -> str:
        resp = gateway.client.post("/generate", headers=headers, json={"prompt": "hi", "adapter": ref})
        assert resp.status_code == 200, resp.text
        return str(gateway.worker.requests[-1].adapter.weights_sha256)  # type: ignore[union-attr]

    assert used_by(user, "shared") == first["sha256"]  # still the version that was shared
    assert used_by(owner, "shared") != first["sha256"]  # the owner gets its latest
    assert gateway.client.post("/generate", headers=user, json={"prompt": "hi", "adapter": "shared@2"}
                               ).status_code == 404
    listed = gateway.client.get("/adapters", headers=user).json()
    assert [(a["name"], [v["version"] for v in a["versions"]]) for a in listed] == [("shared", [1])]


def test_a_deleted_version_number_is_never_given_to_other_weights(gateway: Gateway) -> None:
    _, _, key = _create(gateway, "acme")
    for seed in (1, 2, 3):
        upload(gateway, key, "support", seed=seed)
    assert gateway.client.delete("/adapters/support@3", headers=key).status_code == 204
    fourth = upload(gateway, key, "support", seed=4).json()
    assert fourth["version"] == 4
    assert gateway.client.post("/generate", headers=key, json={"prompt": "hi", "adapter": "support"}).status_code == 200
    assert gateway.worker.requests[-1].adapter.weights_sha256 == fourth["sha256"]  # type: ignore[union-attr]
    resp = gateway.client.post("/generate", headers=key, json={"prompt": "hi", "adapter": "support@3"})
    assert resp.status_code == 404 and "was deleted" in resp.json()["error"]["message"]
    assert gateway.client.delete("/adapters/support", headers=key).status_code == 204
    assert gateway.client.get("/adapters", headers=key).json() == []
    resp = gateway.client.post("/generate", headers=key, json={"prompt": "hi", "adapter": "support"})
    assert resp.status_code == 404 and "was deleted" in resp.json()["error"]["message"]
    assert upload(gateway, key, "support", seed=5).json()["version"] == 5  # numbering goes on


def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(gateway: Gateway) -> None:
    huge = b'{"prompt": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    for headers in ({}, {"Authorization": "Bearer lpx_not-a-key"}):
        resp = gateway.client.post("/generate", content=huge, headers={**headers, "content-type": "application/json"})
        assert resp.status_code == 401, resp.text
    resp = gateway.client.post("/adapters", content=b"x" * 100, headers={"content-type": "multipart/form-data"})
    assert resp.status_code == 401


def test_json_bodies_have_their_own_small_limit(gateway: Gateway) -> None:
    _, _, key = _create(gateway, "acme")
    limit = gateway.settings.max_request_bytes
    body = json.dumps({"prompt": "x" * limit}).encode()
    resp = gateway.client.post("/generate", content=body, headers={**key, "content-type": "application/json"})
    assert resp.status_code == 413 and "max_request_bytes" in resp.json()["error"]["message"]
    resp = gateway.client.post("/admin/tenants", content=body, headers={**gateway.admin(),
                                                                         "content-type": "application/json"})
    assert resp.status_code == 413


def test_hostile_numbers_in_a_request_body_are_4xx(gateway: Gateway) -> None:
    _, _, key = _create(gateway, "acme")
    headers = {**key, "content-type": "application/json"}
    bodies = [
        b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        b'{"prompt": "hi", "temperature": NaN}',
        b'{"prompt": "hi", "temperature": Infinity}',
        b'{"prompt": "hi", "temperature": 1e999}',
        b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ]
    for body in bodies:
        resp = gateway.client.post("/generate", content=body, headers=headers)
        assert resp.status_code == 422, (body[:60], resp.status_code, resp.text[:200])
        assert resp.json()["error"]["type"] == "invalid_request"


def test_an_unexpected_error_is_counted_in_the_request_metrics(gateway: Gateway) -> None:
    _, _, key = _create(gateway, "acme")

    def counted() -> float:
        for line in gateway.client.get("/metrics").text.splitlines():
            if line.startswith("loraplex_http_requests_total{") and 'route="/adapters"' in line and '"5xx"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = counted()
    registry = gateway.client.app.state.services.registry  # type: ignore[attr-defined]

    def broken(_tenant_id: int) -> None:
        raise RuntimeError("/secret/path/to/db is on fire")

    registry.list_adapters = broken
    client = TestClient(gateway.client.app, raise_server_exceptions=False)
    resp = client.get("/adapters", headers=key)
    assert resp.status_code == 500 and "/secret" not in resp.text
    assert counted() == before + 1
