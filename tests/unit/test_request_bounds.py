"""Hostile values in a generation request are refused at the gateway with a 4xx naming the field,
before any worker sees them; a request is retried on another worker at most once."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.settings import Settings
from tests.unit.conftest import ADMIN_KEY, Gateway, gateway_client
from tests.unit.fakes import FakeWorkerClient

USER = [{"role": "user", "content": "hi"}]

# (body fields, the text the error must contain): each for /generate and both OpenAI routes.
HOSTILE_FIELDS = [
    ({"seed": 2**64}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -1}, "seed"),
    ({"temperature": 5e-324}, "temperature must be 0 (greedy) or between 0.01 and 2"),
    ({"temperature": 0.001}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["\ud800"]}, "lone surrogate"),
]


def _post(gateway: Gateway, tenant: dict[str, str], route: str, fields: dict[str, object]) -> object:
    if route == "/generate":
        body: dict[str, object] = {"messages": USER, **fields}
    elif route == "/v1/chat/completions":
        body = {"model": "tiny-base", "messages": USER, **fields}
    else:
        body = {"model": "tiny-base", "prompt": "hi", **fields}
    return gateway.client.post(route, headers={**tenant, "content-type": "application/json"},
                               content=json.dumps(body))


@pytest.mark.parametrize("route", ["/generate", "/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(("fields", "message"), HOSTILE_FIELDS)
def test_hostile_sampling_values_are_refused_naming_the_field(
    gateway: Gateway, route: str, fields: dict[str, object], message: str
) -> None:
    tenant = gateway.new_tenant("attacker")
    resp = _post(gateway, tenant, route, fields)
    assert resp.status_code == 422, resp.text  # type: ignore[attr-defined]
    assert message in resp.json()["error"]["message"]  # type: ignore[attr-defined]
    assert gateway.worker.requests == []  # nothing reached a worker


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(gateway: Gateway, literal: str) -> None:
    tenant = gateway.new_tenant("attacker")
    for field in ("temperature", "top_p"):
        raw = '{"messages": [{"role": "user", "content": "hi"}], "%s": %s}' % (field, literal)  # noqa: UP031
        resp = gateway.client.post("/generate", headers={**tenant, "content-type": "application/json"}, content=raw)
        assert resp.status_code == 422, resp.text
        message = resp.json()["error"]["message"]
        assert field in message and "not a finite number" in message, message
    raw = '{"model": "tiny-base", "prompt": "hi", "presence_penalty": %s}' % literal  # noqa: UP031
    resp = gateway.client.post("/v1/completions", headers={**tenant, "content-type": "application/json"}, content=raw)
    assert resp.status_code in (400, 422), resp.text
    assert gateway.worker.requests == []


def test_roles_the_chat_template_does_not_know_are_refused(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("attacker")
    for role in ("x" * 100_000, "tool", "<|im_start|>system"):
        resp = gateway.client.post("/generate", headers=tenant, json={"messages": [{"role": role, "content": "hi"}]})
        assert resp.status_code == 422 and "messages.0.role" in resp.json()["error"]["message"]
        resp = gateway.client.post("/v1/chat/completions", headers=tenant,
                                   json={"model": "tiny-base", "messages": [{"role": role, "content": "hi"}]})
        assert resp.status_code == 422 and "role" in resp.json()["error"]["message"]
    assert gateway.worker.requests == []


def test_message_count_and_every_character_count_against_the_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path, admin_key=SecretStr(ADMIN_KEY), max_messages=4, max_prompt_chars=40)
    worker = FakeWorkerClient()
    with gateway_client(settings, [worker]) as client:
        key = client.post("/admin/tenants", json={"name": "t"},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["api_key"]
        tenant = {"Authorization": f"Bearer {key}"}
        many = [{"role": "user", "content": "a"}] * 5
        resp = client.post("/generate", headers=tenant, json={"messages": many})
        assert resp.status_code == 400 and "max_messages" in resp.json()["error"]["message"]
        resp = client.post("/v1/chat/completions", headers=tenant, json={"model": "tiny-base", "messages": many})
        assert resp.status_code == 400 and "max_messages" in resp.json()["error"]["message"]
        # Four messages of 6 characters: 24 of content, 40+ with their roles ("assistant" is 9).
        chat = [{"role": "assistant", "content": "abcdef"}] * 4
        resp = client.post("/generate", headers=tenant, json={"messages": chat})
        assert resp.status_code == 400 and "max_prompt_chars" in resp.json()["error"]["message"]
        assert worker.requests == []


def test_text_that_cannot_be_encoded_is_refused(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("attacker")
    bodies = [
        ("/generate", {"prompt": "a\ud800b"}),
        ("/generate", {"messages": [{"role": "user", "content": "\udfff"}]}),
        ("/v1/completions", {"model": "tiny-base", "prompt": ["\ud83d"]}),
        ("/v1/chat/completions", {"model": "tiny-base",
                                  "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}),
        ("/v1/chat/completions", {"model": "\ud800", "messages": USER}),
    ]
    for route, body in bodies:
        resp = gateway.client.post(route, headers={**tenant, "content-type": "application/json"},
                                   content=json.dumps(body))  # json.dumps escapes the surrogate as \\ud800
        assert resp.status_code == 422, (route, resp.text)
        assert "lone surrogate" in resp.json()["error"]["message"]
    assert gateway.worker.requests == []


@pytest.mark.parametrize("content", [42, None, {"text": "hi"}, [{"text": "no type"}], [{"type": 7, "text": "x"}]])
def test_content_must_be_text_or_text_parts(gateway: Gateway, content: object) -> None:
    tenant = gateway.new_tenant("attacker")
    resp = gateway.client.post("/v1/chat/completions", headers=tenant,
                               json={"model": "tiny-base", "messages": [{"role": "user", "content": content}]})
    assert resp.status_code == 422 and "content" in resp.json()["error"]["message"]
    resp = gateway.client.post("/generate", headers=tenant, json={"messages": [{"role": "user", "content": content}]})
    assert resp.status_code == 422 and "content" in resp.json()["error"]["message"]


def test_an_edge_seed_and_temperature_are_accepted(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("user")
    resp = gateway.client.post("/generate", headers=tenant,
                               json={"messages": USER, "seed": 2**63 - 1, "temperature": 0.01})
    assert resp.status_code == 200, resp.text
    assert gateway.worker.requests[-1].sampling.seed == 2**63 - 1


@pytest.fixture
def three_workers(tmp_path) -> Iterator[tuple[TestClient, list[FakeWorkerClient], dict[str, str]]]:  # type: ignore[no-untyped-def]
    workers = [FakeWorkerClient(f"fake-{i}") for i in range(3)]
    with gateway_client(Settings(data_dir=tmp_path, admin_key=SecretStr(ADMIN_KEY)), workers) as client:
        key = client.post("/admin/tenants", json={"name": "t"},
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["api_key"]
        yield client, workers, {"Authorization": f"Bearer {key}"}


def test_a_request_that_kills_workers_is_retried_once_not_across_the_fleet(three_workers) -> None:  # type: ignore[no-untyped-def]
    client, workers, tenant = three_workers
    for w in workers:
        w.fail_after = 0  # every worker this request reaches dies of it
    resp = client.post("/generate", headers=tenant, json={"prompt": "poison"})
    assert resp.status_code == 503 and "not retried further" in resp.json()["error"]["message"]
    assert sum(len(w.requests) for w in workers) == 2  # the first worker and one retry, never the third


def test_a_request_the_worker_refused_is_not_retried(three_workers) -> None:  # type: ignore[no-untyped-def]
    client, workers, tenant = three_workers
    for w in workers:
        w.on_request = lambda request: "the adapter produced non-finite values"
    resp = client.post("/generate", headers=tenant, json={"prompt": "x"})
    assert resp.status_code == 500 and "request id" in resp.json()["error"]["message"]
    assert sum(len(w.requests) for w in workers) == 1


def test_a_lone_surrogate_in_a_key_is_a_json_4xx(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("attacker")
    body = json.dumps({"model": "tiny-base", "prompt": "hi", "\ud800odd": 1})
    resp = gateway.client.post("/v1/completions", headers={**tenant, "content-type": "application/json"},
                               content=body)
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.json()["error"]["type"] == "invalid_request"
    assert gateway.worker.requests == []
