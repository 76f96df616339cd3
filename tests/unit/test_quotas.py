"""Per-tenant limits: 429 with Retry-After and the limit named; storage quotas store nothing."""

from __future__ import annotations

import pytest

from app.errors import TooManyRequests
from app.quotas import RequestQuotas, TenantLimits
from tests.unit.conftest import Gateway
from tests.unit.test_api import upload


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrent_requests_are_capped_until_one_is_released() -> None:
    quotas = RequestQuotas()
    limits = TenantLimits(max_concurrent_requests=2)
    first, _ = quotas.admit(1, limits), quotas.admit(1, limits)
    with pytest.raises(TooManyRequests, match="max_concurrent_requests") as refused:
        quotas.admit(1, limits)
    assert refused.value.retry_after == 1
    quotas.admit(2, limits)  # another tenant is not affected
    first()
    first()  # releasing twice frees one place, not two
    quotas.admit(1, limits)
    with pytest.raises(TooManyRequests):
        quotas.admit(1, limits)


def test_tokens_per_minute_window_slides() -> None:
    clock = Clock()
    quotas = RequestQuotas(clock)
    limits = TenantLimits(tokens_per_minute=100)
    quotas.admit(1, limits)()
    quotas.charge(1, 60)
    clock.now += 20
    quotas.admit(1, limits)()
    quotas.charge(1, 50)
    clock.now += 10
    with pytest.raises(TooManyRequests, match="tokens_per_minute") as refused:
        quotas.admit(1, limits)
    assert refused.value.retry_after == 30  # the first 60 tokens leave the window in 30 s
    clock.now += 31
    quotas.admit(1, limits)


def test_rate_limited_generate_is_429_with_retry_after(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("chatty")
    tenant_id = gateway.client.get("/admin/tenants", headers=gateway.admin()).json()[0]["id"]
    resp = gateway.client.put(f"/admin/tenants/{tenant_id}/limits", headers=gateway.admin(),
                              json={"tokens_per_minute": 5})
    assert resp.status_code == 200 and resp.json()["limits"]["tokens_per_minute"] == 5
    assert gateway.client.post("/generate", headers=tenant, json={"prompt": "a b c d e f"}).status_code == 200
    refused = gateway.client.post("/generate", headers=tenant, json={"prompt": "a b"})
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "rate_limited" and "tokens_per_minute" in error["message"]
    other = gateway.new_tenant("quiet")
    assert gateway.client.post("/generate", headers=other, json={"prompt": "a b"}).status_code == 200


def test_storage_quotas_refuse_before_storing(gateway: Gateway) -> None:
    resp = gateway.client.post("/admin/tenants", headers=gateway.admin(),
                               json={"name": "small", "limits": {"max_adapters": 1}})
    assert resp.status_code == 201
    tenant = {"Authorization": f"Bearer {resp.json()['api_key']}"}
    assert upload(gateway, tenant, "first").status_code == 201
    assert upload(gateway, tenant, "first", seed=1).status_code == 201  # a new version is not a new adapter
    refused = upload(gateway, tenant, "second", seed=2)
    assert refused.status_code == 429 and "max_adapters" in refused.json()["error"]["message"]
    assert [a["name"] for a in gateway.client.get("/adapters", headers=tenant).json()] == ["first"]

    size = upload(gateway, gateway.new_tenant("probe"), "probe").json()["size_bytes"]
    resp = gateway.client.post("/admin/tenants", headers=gateway.admin(),
                               json={"name": "tight", "limits": {"max_adapter_bytes": size + size // 2}})
    tight = {"Authorization": f"Bearer {resp.json()['api_key']}"}
    assert upload(gateway, tight, "one").status_code == 201
    refused = upload(gateway, tight, "one", seed=3)
    assert refused.status_code == 429 and "max_adapter_bytes" in refused.json()["error"]["message"]
    assert gateway.client.get("/adapters/one", headers=tight).json()["latest_version"] == 1


def test_public_adapters_are_usable_by_every_tenant_but_not_deletable(gateway: Gateway) -> None:
    owner, user = gateway.new_tenant("owner"), gateway.new_tenant("user")
    assert upload(gateway, owner, "shared").status_code == 201
    assert gateway.client.post("/generate", headers=user, json={"prompt": "hi", "adapter": "shared"}).status_code == 404
    owner_id = next(t["id"] for t in gateway.client.get("/admin/tenants", headers=gateway.admin()).json()
                    if t["name"] == "owner")
    resp = gateway.client.put(f"/admin/tenants/{owner_id}/adapters/shared/visibility", headers=gateway.admin(),
                              json={"public": True})
    assert resp.status_code == 200 and resp.json()["public_versions"] == [1]
    assert gateway.client.post("/generate", headers=user, json={"prompt": "hi", "adapter": "shared"}).status_code == 200
    assert gateway.client.delete("/adapters/shared", headers=user).status_code == 404
    assert gateway.client.put(f"/admin/tenants/{owner_id}/adapters/shared/visibility", headers=user,
                              json={"public": False}).status_code == 403


def test_a_stream_the_client_leaves_early_is_still_charged_for_what_was_generated(gateway: Gateway) -> None:
    import asyncio

    from app.generation import Generation, GenerationInput
    from worker.protocol import SamplingParams

    gateway.new_tenant("leaver")
    services = gateway.client.app.state.services  # type: ignore[attr-defined]
    tenant = services.tenants.all()[0]
    job = GenerationInput(prompt="one two three four five six", messages=None, adapter=None,
                          sampling=SamplingParams(max_tokens=6))

    async def leave_after_three() -> None:
        generation = Generation(services, tenant, "/generate", job, None)
        events = generation.events()
        for _ in range(3):
            await anext(events)
        await events.aclose()  # the client went away mid-answer

    asyncio.run(leave_after_three())
    # The prompt and the three tokens that were generated; the request no longer counts in flight.
    assert services.quotas.usage(tenant.id) == (0, 6 + 3)
