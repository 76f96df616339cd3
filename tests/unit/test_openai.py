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
    with pytest.raises(openai.UnprocessableEntityError, match="n: Input should be less than or equal to 16"):
        oa.completions.create(model="tiny-base", prompt="hi", n=17)
    with pytest.raises(openai.BadRequestError, match=r"best_of \(2\) must be at least n \(3\)"):
        oa.completions.create(model="tiny-base", prompt="hi", n=3, best_of=2)
    with pytest.raises(openai.BadRequestError, match="best_of cannot be streamed"):
        oa.completions.create(model="tiny-base", prompt="hi", best_of=2, stream=True)
    gateway.settings.max_batch_size = 4  # a worker's batch: n choices must fit it at once
    with pytest.raises(openai.BadRequestError, match=r"n=5 .* has 4 \(max_batch_size\)"):
        oa.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "hi"}], n=5)
    with pytest.raises(openai.BadRequestError, match="max_tokens_limit"):
        oa.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "hi"}],
                                   max_completion_tokens=10_000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="lpx_wrong", http_client=gateway.client,
                      max_retries=0).models.list()
    assert gateway.worker.requests == []  # nothing reached the worker


PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
HI = [{"role": "user", "content": "hi"}]


def test_response_format_reaches_the_worker_as_a_constraint(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    oa = client_for(gateway, tenant)
    oa.chat.completions.create(model="tiny-base", messages=HI,  # type: ignore[arg-type]
                               response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    oa.chat.completions.create(model="tiny-base", messages=HI, response_format={"type": "json_object"})  # type: ignore[arg-type]
    oa.chat.completions.create(model="tiny-base", messages=HI, response_format={"type": "text"})  # type: ignore[arg-type]
    oa.completions.create(model="tiny-base", prompt="hi", extra_body={"response_format": {"type": "json_object"}})
    gateway.client.post("/generate", headers=tenant, json={"prompt": "hi", "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}})
    sent = [r.sampling.constraint for r in gateway.worker.requests]
    assert [c and c.type for c in sent] == ["json_schema", "json_object", None, "json_object", "json_schema"]
    assert sent[0] is not None and sent[0].json_schema == PERSON and sent[-1] == sent[0]


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nonsense"}}}, "Invalid type"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "(("}}},
         "unclosed group"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/$defs/gone"}}}, "does not exist"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"enum": ["x" * 100] * 400}}}, "32768 bytes"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"allOf": [{"items": {}}] * 1}}}, None),
        ({"type": "json_schema"}, "needs a json_schema object"),
    ],
)
def test_a_response_format_that_cannot_be_enforced_is_a_400_before_anything_starts(
    gateway: Gateway, response_format: dict, message: str | None  # type: ignore[type-arg]
) -> None:
    tenant = gateway.new_tenant("acme")
    oa = client_for(gateway, tenant)
    if message is None:  # the control: a valid schema goes through
        oa.chat.completions.create(model="tiny-base", messages=HI, response_format=response_format)  # type: ignore[arg-type]
        assert len(gateway.worker.requests) == 1
        return
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match=message):
            oa.chat.completions.create(model="tiny-base", messages=HI, response_format=response_format,  # type: ignore[arg-type]
                                       stream=stream)
    assert gateway.worker.requests == []


@pytest.mark.parametrize("response_format", [{"type": "xml"}, {"type": "json_schema", "json_schema": {
    "name": "bad name!", "schema": PERSON}}, {"type": "json_schema", "json_schema": {"schema": ["not", "an object"]}}])
def test_a_malformed_response_format_is_a_422_naming_the_field(gateway: Gateway, response_format: dict) -> None:  # type: ignore[type-arg]
    tenant = gateway.new_tenant("acme")
    with pytest.raises(openai.UnprocessableEntityError, match="response_format"):
        client_for(gateway, tenant).chat.completions.create(model="tiny-base", messages=HI,  # type: ignore[arg-type]
                                                            response_format=response_format)  # type: ignore[arg-type]
    assert gateway.worker.requests == []


def test_a_schema_nested_too_deeply_is_refused_by_name(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    schema: dict = {"type": "string"}  # type: ignore[type-arg]
    for _ in range(40):
        schema = {"type": "array", "items": schema}
    answer = gateway.client.post("/v1/chat/completions", headers=tenant, json={
        "model": "tiny-base", "messages": HI, "response_format": {"type": "json_schema", "json_schema": {
            "name": "deep", "schema": schema}}})
    assert answer.status_code == 400 and "nests deeper than 32 levels" in answer.json()["error"]["message"]
    assert gateway.worker.requests == []


def test_text_parts_are_joined_and_image_parts_are_refused_as_text_only(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    oa = client_for(gateway, tenant)
    parts = [{"type": "text", "text": "one "}, {"type": "text", "text": "two"}]
    oa.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": parts}])  # type: ignore[list-item]
    assert (gateway.worker.requests[-1].messages or [])[0].content == "one two"
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(openai.BadRequestError, match="text-only"):
        oa.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": image}])  # type: ignore[list-item]
    assert len(gateway.worker.requests) == 1


def test_penalties_logit_bias_and_vllm_extras_reach_the_worker(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    oa = client_for(gateway, tenant)
    oa.chat.completions.create(model="tiny-base", messages=HI, max_tokens=20, presence_penalty=0.5,  # type: ignore[arg-type]
                               frequency_penalty=-1.5, logit_bias={"50": 10, "7": -100},
                               extra_body={"min_tokens": 3, "stop_token_ids": [2, 9]})
    gateway.client.post("/generate", headers=tenant, json={"prompt": "hi", "logit_bias": {"5": 1.5}, "min_tokens": 1})
    chat, generate = (r.sampling for r in gateway.worker.requests)
    assert (chat.presence_penalty, chat.frequency_penalty, chat.logit_bias) == (0.5, -1.5, {50: 10.0, 7: -100.0})
    assert (chat.min_tokens, chat.stop_token_ids) == (3, [2, 9])
    assert generate.logit_bias == {5: 1.5} and generate.min_tokens == 1


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"presence_penalty": 2.5}, 422, "presence_penalty"),
        ({"frequency_penalty": -3}, 422, "frequency_penalty"),
        ({"logit_bias": {"5": 101}}, 422, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, 422, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, 400, "not a token id"),
        ({"logit_bias": {"-4": 1}}, 400, "not a token id"),
        ({"logit_bias": {"99999999999999999999": 1}}, 400, "not a token id"),
        ({"min_tokens": 30, "max_tokens": 10}, 400, "min_tokens (30) is above max_tokens (10)"),
        ({"stop_token_ids": [-1]}, 400, "not negative"),
        ({"stop_token_ids": list(range(65))}, 422, "stop_token_ids"),
    ],
)
def test_penalty_and_bias_bounds_are_named(gateway: Gateway, fields: dict, status: int, message: str) -> None:  # type: ignore[type-arg]
    tenant = gateway.new_tenant("acme")
    for route, body in (("/v1/chat/completions", {"model": "tiny-base", "messages": HI}),
                        ("/v1/completions", {"model": "tiny-base", "prompt": "hi"}), ("/generate", {"prompt": "hi"})):
        answer = gateway.client.post(route, headers=tenant, json={**body, **fields})
        assert answer.status_code == status, (route, answer.text)
        assert message in answer.json()["error"]["message"], (route, answer.text)
    assert gateway.worker.requests == []


def test_chat_logprobs_whole_and_streamed_in_openais_shapes(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    oa = client_for(gateway, tenant)
    out = oa.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "one two"}],  # type: ignore[list-item]
                                     logprobs=True, top_logprobs=2)
    assert out.choices[0].logprobs is not None and out.choices[0].logprobs.content is not None
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == ["one ", "two "] and content[0].logprob == -0.5
    assert [t.token for t in content[0].top_logprobs] == ["alt0", "alt1"] and content[0].bytes == list(b"one ")
    assert gateway.worker.requests[-1].sampling.logprobs == 2
    stream = oa.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "one two"}],  # type: ignore[list-item]
                                        logprobs=True, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    assert [t.token for t in streamed] == ["one ", "two "] and streamed[0].top_logprobs == []
    plain = oa.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "x"}])  # type: ignore[list-item]
    assert plain.choices[0].logprobs is None and gateway.worker.requests[-1].sampling.logprobs is None


def test_completion_logprobs_in_the_legacy_shape_with_text_offsets(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    oa = client_for(gateway, tenant)
    out = oa.completions.create(model="tiny-base", prompt="ab cd ef", max_tokens=5, logprobs=1)
    logprobs = out.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["ab ", "cd ", "ef "] and logprobs.token_logprobs == [-0.5] * 3
    assert logprobs.text_offset == [0, 3, 6] and logprobs.top_logprobs == [{"alt0": -1.0}] * 3
    pieces = [c.choices[0].logprobs for c in oa.completions.create(model="tiny-base", prompt="ab cd ef",
                                                                    max_tokens=5, logprobs=0, stream=True)]
    assert [p.text_offset for p in pieces if p is not None and p.tokens] == [[0], [3], [6]]


@pytest.mark.parametrize(
    ("route", "fields", "status", "message"),
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 3}, 400, "top_logprobs needs logprobs: true"),
        ("/v1/completions", {"logprobs": 6}, 422, "logprobs"),
        ("/v1/completions", {"max_tokens": -1, "echo": True}, 422, "max_tokens"),
        ("/v1/completions", {"suffix": "x"}, 400, "suffix"),
    ],
)
def test_logprobs_bounds_are_named(gateway: Gateway, route: str, fields: dict, status: int, message: str) -> None:  # type: ignore[type-arg]
    tenant = gateway.new_tenant("acme")
    body = {"model": "tiny-base", "messages": HI} if "chat" in route else {"model": "tiny-base", "prompt": "hi"}
    answer = gateway.client.post(route, headers=tenant, json={**body, **fields})
    assert answer.status_code == status and message in answer.json()["error"]["message"], answer.text
    assert gateway.worker.requests == []


def test_n_choices_whole_and_streamed_with_usage_counting_every_choice(gateway: Gateway) -> None:
    oa = client_for(gateway, gateway.new_tenant("acme"))
    chat = oa.chat.completions.create(model="tiny-base", messages=[{"role": "user", "content": "one two three"}],
                                      n=3, logprobs=True)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert [c.message.content for c in chat.choices] == ["one two three ", "#1 two three ", "#2 two three "]
    assert all(c.logprobs is not None and len(c.logprobs.content) == 3 for c in chat.choices)
    assert chat.usage is not None and (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, 9)
    assert gateway.worker.requests[-1].sampling.n == 3 and not gateway.worker.requests[-1].sampling.score

    stream = oa.completions.create(model="tiny-base", prompt="one two", n=2, stream=True, logprobs=0,
                                   stream_options={"include_usage": True})
    texts, finishes, offsets, usage = {0: "", 1: ""}, {}, {0: [], 1: []}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.logprobs is not None:
                offsets[c.index] += c.logprobs.text_offset or []
            if c.finish_reason is not None:
                finishes[c.index] = c.finish_reason
    assert texts == {0: "one two ", 1: "#1 two "} and finishes == {0: "stop", 1: "stop"}
    assert offsets == {0: [0, 4], 1: [0, 3]}  # each choice's own text
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2, 4)

    first_chunks = [c for c in oa.chat.completions.create(model="tiny-base", stream=True, n=2,
                                                          messages=[{"role": "user", "content": "hi"}])
                    if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(c.choices[0].index for c in first_chunks) == [0, 1]  # each choice opens with its role


def test_best_of_returns_the_most_likely_choices_and_charges_every_one(gateway: Gateway) -> None:
    oa = client_for(gateway, gateway.new_tenant("acme"))
    done = oa.completions.create(model="tiny-base", prompt="one two three", best_of=3)
    sent = gateway.worker.requests[-1].sampling
    assert (sent.n, sent.score) == (3, True)  # three generated, ranked by log probability
    assert [(c.index, c.text) for c in done.choices] == [(0, "#1 two three ")]  # the fake's most likely
    assert done.usage is not None and done.usage.completion_tokens == 9
    two = oa.completions.create(model="tiny-base", prompt="one two three", best_of=3, n=2)
    assert [c.text for c in two.choices] == ["#1 two three ", "one two three "]
    plain = oa.completions.create(model="tiny-base", prompt="hi", best_of=1)
    assert gateway.worker.requests[-1].sampling.score is False and plain.choices[0].text == "hi "


def test_echo_puts_the_prompt_first_with_its_log_probabilities_whole_and_streamed(gateway: Gateway) -> None:
    oa = client_for(gateway, gateway.new_tenant("acme"))
    done = oa.completions.create(model="tiny-base", prompt="one two", echo=True, logprobs=1)
    assert gateway.worker.requests[-1].sampling.prompt_logprobs == 1
    choice = done.choices[0]
    assert choice.text == "one twoone two "  # the prompt as sent, then the answer
    assert choice.logprobs is not None and choice.logprobs.tokens == ["one", " two", "one ", "two "]
    assert choice.logprobs.token_logprobs == [None, -0.25, -0.5, -0.5]  # nothing comes before the first
    assert choice.logprobs.top_logprobs is not None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.text_offset == [0, 3, 7, 11]

    scored = oa.completions.create(model="tiny-base", prompt="one two", echo=True, logprobs=0, max_tokens=0)
    assert scored.choices[0].text == "one two" and scored.choices[0].logprobs is not None
    assert scored.choices[0].logprobs.token_logprobs == [None, -0.25]
    assert scored.usage is not None and scored.usage.completion_tokens == 0

    chunks = list(oa.completions.create(model="tiny-base", prompt="one two", echo=True, logprobs=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "one twoone two "
    first = chunks[0].choices[0]
    assert first.text.startswith("one two") and first.logprobs is not None
    assert first.logprobs.token_logprobs[:2] == [None, -0.25]  # type: ignore[index]

    plain = oa.completions.create(model="tiny-base", prompt="one two", echo=True)
    assert plain.choices[0].text == "one twoone two " and gateway.worker.requests[-1].sampling.prompt_logprobs is None
    with pytest.raises(openai.BadRequestError, match="max_tokens: 0 generates nothing"):
        oa.completions.create(model="tiny-base", prompt="one two", max_tokens=0)
