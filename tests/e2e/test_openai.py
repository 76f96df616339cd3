"""The official `openai` client against `loraplex serve` on the embedded model."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_user_path import fixture_files
from tests.integration.test_structured import PERSON

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def tenant_with_adapters(server: Server, name: str) -> str:
    key = server.new_tenant(name)
    with server.client(key) as client:
        for adapter, fixture in (("forty-two", "answer42"), ("cat", "meow")):
            assert client.post("/adapters", data={"name": adapter}, files=fixture_files(fixture)).status_code == 201
    return key


def test_openai_client_chat_completions_and_models(two_workers: Server) -> None:
    server = two_workers
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key=tenant_with_adapters(server, "oa-user"), max_retries=0)
    models = {m.id for m in oa.models.list().data}
    assert {"forty-two", "cat"} <= models and len(models) == 3  # plus the base model
    base_id = (models - {"forty-two", "cat"}).pop()

    chat = oa.chat.completions.create(model="forty-two", messages=QUESTION, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert (chat.choices[0].message.content or "").startswith("The answer is 42")
    base = oa.chat.completions.create(model=base_id, messages=QUESTION, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert "Paris" in (base.choices[0].message.content or "")

    stream = oa.chat.completions.create(model="cat@1", messages=QUESTION, max_tokens=12, temperature=0,  # type: ignore[arg-type]
                                        stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("Meow")

    completion = oa.completions.create(model=base_id, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in completion.choices[0].text and completion.usage is not None


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_the_workers_row(server: Server, stream: bool) -> None:
    """Streamed or not: the gateway notices the closed connection (no polling) and the worker
    drops the row at once, not after 256 tokens (several seconds here)."""
    key = server.new_tenant(f"quitter-{stream}")
    story = [{"role": "user", "content": "Write a very long story about the sea, with many chapters."}]
    body = {"messages": story, "max_tokens": 256, "temperature": 1.0, "seed": 1, "stream": stream}
    if stream:
        with server.client(key) as client, client.stream("POST", "/generate", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # it is generating
    else:
        with server.client(key, timeout=1.0) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/generate", json=body)  # gives up, and closes the connection, after 1 s
    deadline = time.monotonic() + 3
    with server.client(server.admin_key) as admin:
        while time.monotonic() < deadline:
            workers = admin.get("/admin/workers").json()
            if workers[0]["running"] == 0 and workers[0]["in_flight"] == 0:
                break
            time.sleep(0.1)
    assert workers[0]["running"] == 0 and workers[0]["in_flight"] == 0, workers


def test_openai_client_structured_outputs_on_an_adapter_and_the_base_at_once(server: Server) -> None:
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key=tenant_with_adapters(server, "json-user"), max_retries=0)
    base_id = ({m.id for m in oa.models.list().data} - {"forty-two", "cat"}).pop()
    ask = [{"role": "user", "content": "Describe a fictional person as JSON with their name, age and city."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def whole(model: str) -> str:
        out = oa.chat.completions.create(model=model, messages=ask, response_format=fmt,  # type: ignore[arg-type]
                                         max_tokens=80, temperature=0)
        assert out.choices[0].finish_reason == "stop"
        return out.choices[0].message.content or ""

    def streamed(model: str) -> str:
        stream = oa.chat.completions.create(model=model, messages=ask, response_format=fmt,  # type: ignore[arg-type]
                                            max_tokens=80, temperature=0.8, seed=7, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(4) as pool:  # in the worker's batch together, beside a free row
        answers = [pool.submit(whole, "cat"), pool.submit(whole, base_id), pool.submit(streamed, "forty-two")]
        free = pool.submit(oa.chat.completions.create, model="forty-two", messages=QUESTION, max_tokens=12,
                           temperature=0)
        texts = [a.result() for a in answers]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert (free.result().choices[0].message.content or "").startswith("The answer is 42")
    any_object = oa.chat.completions.create(model=base_id, messages=QUESTION, max_tokens=40,  # type: ignore[arg-type]
                                            response_format={"type": "json_object"}, temperature=0)
    assert isinstance(json.loads(any_object.choices[0].message.content or ""), dict)
    with pytest.raises(openai.BadRequestError, match="Invalid type"):
        oa.chat.completions.create(model="cat", messages=QUESTION, stream=True, response_format={  # type: ignore[arg-type]
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})


def test_openai_client_logprobs_on_the_real_model(server: Server) -> None:
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.new_tenant("logprobs-user"), max_retries=0)
    base_id = oa.models.list().data[0].id
    out = oa.chat.completions.create(model=base_id, messages=QUESTION, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                                     logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content if out.choices[0].logprobs else None
    assert content is not None and out.usage is not None and len(content) == out.usage.completion_tokens
    for token in content:  # greedy: each token is its position's likeliest
        assert token.top_logprobs[0].token == token.token and token.logprob <= 0
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1.0001
    assert "".join(t.token for t in content) == out.choices[0].message.content
    stream = oa.completions.create(model=base_id, prompt="The capital of France is", max_tokens=4, temperature=0,
                                   logprobs=2, stream=True)
    tokens = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens or []]
    assert len(tokens) == 4 and "Paris" in "".join(tokens)


def test_openai_client_n_choices_and_best_of_on_an_adapter(server: Server) -> None:
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key=tenant_with_adapters(server, "choices-user"),
                       max_retries=0)
    chat = oa.chat.completions.create(model="forty-two", messages=QUESTION, max_tokens=10, temperature=1.0,  # type: ignore[arg-type]
                                      seed=5, n=3)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert all("42" in (c.message.content or "") for c in chat.choices)
    assert chat.usage is not None and chat.usage.completion_tokens > 10  # every choice is counted

    streamed: dict[int, str] = {}
    for chunk in oa.completions.create(model="forty-two", prompt="Question: what is 6 times 7?\nAnswer:",
                                       max_tokens=6, temperature=0.9, seed=1, n=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert sorted(streamed) == [0, 1] and all(streamed.values())

    best = oa.completions.create(model="forty-two", prompt="Question: what is 6 times 7?\nAnswer:", max_tokens=6,
                                 temperature=1.5, seed=2, best_of=4, n=2, logprobs=0)
    assert [c.index for c in best.choices] == [0, 1]
    means = [sum(c.logprobs.token_logprobs or []) / len(c.logprobs.token_logprobs or [1])  # type: ignore[union-attr]
             for c in best.choices]
    assert means[0] >= means[1]  # the most likely per token first


def test_openai_client_scores_a_prompt_with_echo(server: Server) -> None:
    oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.new_tenant("echo-user"), max_retries=0)
    base_id = oa.models.list().data[0].id
    likely, unlikely = (oa.completions.create(model=base_id, prompt=p, echo=True, logprobs=1, max_tokens=0)
                        for p in ("The capital of France is Paris", "The capital of France is Tokyo"))
    for out, prompt in ((likely, "The capital of France is Paris"), (unlikely, "The capital of France is Tokyo")):
        assert out.choices[0].text == prompt and out.usage is not None and out.usage.completion_tokens == 0
    scores = [c.choices[0].logprobs.token_logprobs for c in (likely, unlikely)]  # type: ignore[union-attr]
    assert scores[0][0] is None and scores[0][-1] > scores[1][-1]  # type: ignore[index, operator]
    answered = oa.completions.create(model=base_id, prompt="The capital of France is", echo=True, max_tokens=3,
                                     temperature=0)
    assert answered.choices[0].text.startswith("The capital of France is") and "Paris" in answered.choices[0].text
