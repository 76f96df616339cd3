"""n > 1 on the real engine: several choices from one prompt, prefilled once."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

from tests.integration.conftest import Worker, worker_request
from tests.integration.test_engine import FRANCE, wait_idle
from worker import metrics
from worker.prompts import PromptError
from worker.protocol import Constraint, GenerateEvent


@dataclass
class Choices:
    n: int
    events: list[GenerateEvent] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def sink(self, event: GenerateEvent) -> None:
        self.events.append(event)
        if event.error is not None or sum(e.finished for e in self.events) == self.n:
            self.done.set()

    def wait(self) -> dict[int, GenerateEvent]:
        """Each choice's final event, once all have finished."""
        assert self.done.wait(300), "the choices did not all finish"
        return {e.index: e for e in self.events if e.finished}

    def text(self, index: int) -> str:
        return "".join(e.text for e in self.events if e.index == index)


def submit(worker: Worker, question: str, adapter: str | None = None, **sampling: object) -> tuple[str, Choices]:
    request = worker_request(question, worker.refs[adapter] if adapter else None, **sampling)
    prepared = worker.loaded.prompts.prepare(request)
    choices = Choices(request.sampling.n)
    worker.loaded.engine.submit(request, prepared.ids, choices.sink, prepared.matcher)
    return request.request_id, choices


def prompt_tokens_prefilled() -> float:
    return metrics.PROMPT_TOKENS._value.get()  # type: ignore[attr-defined, no-any-return]


def test_greedy_choices_copy_the_prompt_and_answer_as_one_request_would(worker: Worker) -> None:
    alone = worker.ask(FRANCE, max_tokens=10)
    wait_idle(worker)
    before = prompt_tokens_prefilled()
    _, choices = submit(worker, FRANCE, n=3, max_tokens=10)
    finals = choices.wait()
    # Choices 1 and 2 decode from a copy of choice 0's keys and values: any error in the copy shows here.
    assert [choices.text(i) for i in range(3)] == [alone] * 3
    prompt = finals[0].usage.prompt_tokens  # type: ignore[union-attr]
    assert prompt_tokens_prefilled() - before == prompt  # prefilled once, not three times
    assert all(f.usage is not None and f.usage.prompt_tokens == prompt for f in finals.values())
    wait_idle(worker)
    assert worker.loaded.engine.regions.used == 0  # every choice's region came back


def test_sampled_choices_differ_and_a_seed_makes_them_reproducible(worker: Worker) -> None:
    question = "Write one sentence about the sea."
    _, first = submit(worker, question, n=4, temperature=1.0, seed=7, max_tokens=16)
    _, again = submit(worker, question, n=4, temperature=1.0, seed=7, max_tokens=16)
    first.wait(), again.wait()
    texts = [first.text(i) for i in range(4)]
    assert len(set(texts)) > 1  # each choice draws from its own random stream
    assert texts == [again.text(i) for i in range(4)]
    single = worker.ask(question, temperature=1.0, seed=8, max_tokens=16)
    assert single == texts[1]  # choice i draws from seed + i


def test_choices_on_an_adapter_beside_other_rows_and_its_slot_is_freed(worker: Worker) -> None:
    _, choices = submit(worker, FRANCE, "answer42", n=3, max_tokens=10)
    _, base = worker.submit(FRANCE, max_tokens=10)
    choices.wait()
    assert all("42" in choices.text(i) for i in range(3))
    assert "Paris" in base.text
    wait_idle(worker)
    assert worker.loaded.adapters._refs == {}  # every choice's pin on the slot was released


def test_each_choice_keeps_its_own_grammar_state(worker: Worker) -> None:
    # No other properties: every answer closes well inside max_tokens, whatever the sampled path.
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    _, choices = submit(worker, "Name a city as JSON.", n=3, temperature=1.0, seed=3, max_tokens=40,
                        constraint=Constraint(type="json_schema", json_schema=schema))
    finals = choices.wait()
    assert all(f.error is None for f in finals.values())
    for i in range(3):
        assert isinstance(json.loads(choices.text(i))["city"], str)


def test_a_score_is_the_sum_of_the_choices_log_probabilities(worker: Worker) -> None:
    _, choices = submit(worker, FRANCE, n=2, temperature=1.0, seed=11, max_tokens=8, score=True, logprobs=0)
    finals = choices.wait()
    for i, final in finals.items():
        entries = [lp for e in choices.events if e.index == i for lp in e.logprobs or []]
        assert len(entries) == final.usage.completion_tokens  # type: ignore[union-attr]
        assert abs(sum(lp.logprob for lp in entries) - final.cumulative_logprob) < 1e-3  # type: ignore[operator]


def test_aborting_ends_every_choice_and_frees_every_row(worker: Worker) -> None:
    request_id, choices = submit(worker, "Count from one to one thousand.", n=3, max_tokens=400, ignore_eos=True)
    deadline = time.monotonic() + 120
    while not choices.events and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.loaded.engine.abort(request_id)
    finals = choices.wait()
    assert {f.finish_reason for f in finals.values()} == {"abort"} and len(finals) == 3
    wait_idle(worker)
    assert worker.loaded.engine.stats() == (0, 0) and worker.loaded.engine.regions.used == 0


def test_more_choices_than_the_batch_or_the_kv_pool_holds_are_refused(worker: Worker) -> None:
    prompts = worker.loaded.prompts
    try:
        prompts.prepare(worker_request(FRANCE, n=9))  # this worker's batch has 8 rows
    except PromptError as exc:
        assert "max_batch_size" in str(exc)
    else:
        raise AssertionError("n above the batch was accepted")
    each = prompts.limits.kv_cache_tokens // 8 + 1  # 8 choices of this many tokens cannot all fit
    try:
        prompts.prepare(worker_request(FRANCE, n=8, max_tokens=each))
    except PromptError as exc:
        assert "8 choices" in str(exc) and "kv_cache_mb" in str(exc)
    else:
        raise AssertionError("n choices beyond the KV pool were accepted")


def test_prompt_log_probabilities_across_chunk_boundaries_with_no_tokens_generated(worker: Worker) -> None:
    alphabet = " ".join("abcdefghijklmnopqrstuvwxyz") + " "
    request = worker_request("", max_tokens=0, prompt_logprobs=2, n=2).model_copy(
        update={"messages": None, "prompt": alphabet * 8})
    prepared = worker.loaded.prompts.prepare(request)
    assert len(prepared.ids) > 3 * 64  # prefilled in four chunks of at most 64
    choices = Choices(2)
    worker.loaded.engine.submit(request, prepared.ids, choices.sink, prepared.matcher)
    finals = choices.wait()
    assert all(f.finish_reason == "length" and f.usage.completion_tokens == 0 for f in finals.values())  # type: ignore[union-attr]
    scored = [e.prompt_logprobs for e in choices.events if e.prompt_logprobs is not None]
    assert len(scored) == 2 and scored[0] == scored[1]  # the second choice shares the first's prompt
    entries = scored[0]
    assert len(entries) == len(prepared.ids) and entries[0].logprob is None
    assert "".join(e.token for e in entries) == alphabet * 8
    assert all(len(e.top) == 2 and e.top[0].logprob >= e.top[1].logprob for e in entries[1:])
    # The repeats are easy to predict, including the tokens at chunk boundaries (64, 128, 192):
    # a misaligned position would score the wrong token there.
    repeat = len(entries) // 8
    later = entries[2 * repeat : -1]  # the last, a lone trailing space, is rare after "z" and rightly unlikely
    assert all(e.logprob is not None and e.logprob > -1.0 for e in later), [(e.token, e.logprob) for e in later]
    assert all(entries[i].logprob is not None and entries[i].logprob > -1.0 for i in (128, 192))  # type: ignore[operator]
