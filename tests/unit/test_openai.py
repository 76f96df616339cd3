"""The OpenAI-compatible API, driven by the official `openai` client over a fake worker."""

from __future__ import annotations

import openai
import pytest

from tests.unit.conftest import Gateway
from tests.unit.test_api import upload


def client_for(gw: Gateway, headers: dict[str, str]) -> openai.OpenAI:
    key = headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=gw.client, max_retries=0)


def test_models_lists_the_base_and_the_tenants_adapters(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    assert upload(gateway, tenant, "support").status_code == 201
    other = gateway.new_tenant("other")
    assert upload(gateway, other, "theirs", seed=3).status_code == 201
    cards = {m.id: m for m in client_for(gateway, tenant).models.list().data}
    assert set(cards) == {"tiny-base", "support"}  # never another tenant's adapter
    assert cards["support"].parent == "tiny-base"  # type: ignore[attr-defined]


def test_completions_with_an_adapter_and_the_base(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    version = upload(gateway, tenant, "support").json()
    oa = client_for(gateway, tenant)
    out = oa.completions.create(model="support", prompt="one two three", max_tokens=10)
    assert out.choices[0].text.startswith("[") and "one two three" in out.choices[0].text
    assert out.choices[0].finish_reason == "stop" and out.usage is not None and out.usage.completion_tokens == 4
    pinned = oa.completions.create(model="support@1", prompt="one", max_tokens=10)
    assert pinned.choices[0].text == out.choices[0].text.removesuffix("two three ")
    base = oa.completions.create(model="tiny-base", prompt="one two three", max_tokens=2)
    assert base.choices[0].text == "one two " and base.choices[0].finish_reason == "length"
    assert gateway.worker.requests[0].adapter is not None and gateway.worker.requests[-1].adapter is None
    assert gateway.worker.requests[0].adapter.weights_sha256 == version["sha256"]
    assert gateway.worker.requests[0].sampling.temperature == 1.0  # OpenAI's default, not greedy


def test_chat_completions_whole_and_streamed(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    upload(gateway, tenant, "support")
    oa = client_for(gateway, tenant)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    out = oa.chat.completions.create(model="support", messages=messages, temperature=0, seed=5)  # type: ignore[arg-type]
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content.endswith("hello there ")  # type: ignore[union-attr]
    sent = gateway.worker.requests[-1]
    assert [m.role for m in sent.messages or []] == ["system", "user"] and sent.sampling.seed == 5

    stream = oa.chat.completions.create(model="support", messages=messages, stream=True,  # type: ignore[arg-type]
                                        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == out.usage.completion_tokens  # type: ignore[union-attr]


def test_completion_stream_yields_text_pieces(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    pieces = [c.choices[0].text for c in client_for(gateway, tenant).completions.create(
        model="tiny-base", prompt="a b c", max_tokens=8, stream=True)]
    assert "".join(pieces) == "a b c " and len([p for p in pieces if p]) == 3


def test_unknown_models_and_unsupported_options_are_clear_errors(gateway: Gateway) -> None:
    tenant, other = gateway.new_tenant("acme"), gateway.new_tenant("other")
    upload(gateway, other, "theirs")
    oa = client_for(gateway, tenant)
    with pytest.raises(openai.NotFoundError, match="theirs"):
        oa.completions.create(model="theirs", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="n: only one"):
        oa.completions.create(model="tiny-base", prompt="hi", n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens_limit"):
        oa.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "hi"}],
                                   max_completion_tokens=10_000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="lpx_wrong", http_client=gateway.client,
                      max_retries=0).models.list()
    assert gateway.worker.requests == []  # nothing reached the worker
