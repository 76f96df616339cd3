"""OpenAI's penalties, logit_bias, min_tokens and stop_token_ids on the embedded model, per row."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Worker, worker_request
from worker.prompts import PromptError

FRANCE = "What is the capital of France?"


def token_of(worker: Worker, text: str) -> int:
    ids = worker.loaded.prompts.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, ids
    return int(ids[0])


def test_logit_bias_steers_only_its_own_row_in_a_batch(worker: Worker) -> None:
    plain_alone = worker.ask(FRANCE, max_tokens=8)
    meow = token_of(worker, " banana")
    _, biased = worker.submit(FRANCE, max_tokens=4, logit_bias={meow: 100.0})
    _, plain = worker.submit(FRANCE, max_tokens=8)
    _, banned = worker.submit(FRANCE, max_tokens=8, logit_bias={token_of(worker, " Paris"): -100.0})
    assert all(o.final.error is None for o in (biased, plain, banned))
    assert biased.text.split() == ["banana"] * 4, biased.text
    assert plain.text == plain_alone and "Paris" in plain.text
    assert "Paris" not in banned.text.split("\n")[0]


def test_a_frequency_penalty_breaks_a_repetition(worker: Worker) -> None:
    prompt = "Repeat the word 'dog' twenty times, separated by spaces."
    repeated = worker.ask(prompt, max_tokens=30, ignore_eos=True)
    penalized = worker.ask(prompt, max_tokens=30, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    assert repeated.lower().count("dog") > penalized.lower().count("dog")


def test_min_tokens_holds_off_the_end_and_stop_token_ids_end_it(worker: Worker) -> None:
    _, short = worker.submit(FRANCE, max_tokens=80)
    assert short.final.finish_reason == "stop" and short.final.usage is not None
    natural = short.final.usage.completion_tokens
    _, held = worker.submit(FRANCE, max_tokens=natural + 30, min_tokens=natural + 10)
    assert held.final.usage is not None and held.final.usage.completion_tokens >= natural + 10
    paris = token_of(worker, " Paris")
    _, stopped = worker.submit(FRANCE, max_tokens=30, stop_token_ids=[paris])
    assert stopped.final.error is None
    assert stopped.final.finish_reason == "stop" and stopped.text.endswith("Paris")


def test_token_ids_outside_the_vocabulary_are_refused_before_the_engine(worker: Worker) -> None:
    vocab = len(worker.loaded.prompts.tokenizer)
    for sampling in ({"logit_bias": {vocab: 5.0}}, {"stop_token_ids": [vocab + 7]}):
        with pytest.raises(PromptError, match=f"vocabulary of {vocab} tokens"):
            worker.loaded.prompts.prepare(worker_request(FRANCE, **sampling))


def test_logprobs_of_every_generated_token_and_its_alternatives(worker: Worker) -> None:
    _, greedy = worker.submit(FRANCE, max_tokens=8, logprobs=3)
    _, plain = worker.submit(FRANCE, max_tokens=8)
    _, sampled = worker.submit(FRANCE, max_tokens=8, logprobs=0, temperature=1.0, seed=1)
    assert greedy.final.usage is not None and sampled.final.usage is not None
    entries = [e for event in greedy.events for e in event.logprobs or []]
    assert len(entries) == greedy.final.usage.completion_tokens
    assert "".join(bytes(e.bytes).decode(errors="replace") for e in entries) == greedy.text  # no stop cut here
    for entry in entries:
        assert len(entry.top) == 3 and entry.logprob <= 0
        assert entry.top[0].token == entry.token and entry.top[0].logprob == entry.logprob  # greedy: the likeliest
        assert entry.top[0].logprob >= entry.top[1].logprob >= entry.top[2].logprob
    assert all(event.logprobs is None for event in plain.events)  # not asked, not sent
    sampled_entries = [e for event in sampled.events for e in event.logprobs or []]
    assert len(sampled_entries) == sampled.final.usage.completion_tokens and all(not e.top for e in sampled_entries)
