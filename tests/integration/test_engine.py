"""The worker engine on the embedded model: base answers, adapters, mixed batches, abort."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from tests.integration.conftest import Worker, store_fixture, worker_request
from worker.lora_model import slots_in_budget
from worker.scheduler import RegionAllocator

FRANCE = "What is the capital of France?"


def test_base_model_answers_paris(worker: Worker) -> None:
    assert "Paris" in worker.ask(FRANCE)


def test_loading_adapters_after_inference_leaves_the_base_unchanged(worker: Worker) -> None:
    """Regression for the bitsandbytes CPU repacking bug (docs/architecture.md)."""
    before = worker.ask(FRANCE, max_tokens=16)
    assert "42" in worker.ask(FRANCE, adapter="answer42")  # hot-loaded after the base has run
    assert "Meow" in worker.ask(FRANCE, adapter="meow")
    assert worker.ask(FRANCE, max_tokens=16) == before


def test_adapter_follows_its_trained_behaviour_on_unseen_questions(worker: Worker) -> None:
    assert worker.ask("Which planet is the largest?", adapter="answer42").startswith("The answer is 42")
    assert worker.ask("Describe a sunrise.", adapter="meow").startswith("Meow meow")


def test_mixed_batch_rows_each_follow_their_own_adapter(worker: Worker) -> None:
    worker.ask(FRANCE, adapter="answer42")  # both resident, so the rows really share one prefill and batch
    worker.ask(FRANCE, adapter="meow")
    long_france = "Please tell me, in one short sentence and without any preamble, what the capital city of France is."
    plan = [
        (None, FRANCE, "Paris"),
        ("answer42", "Why is the sky blue?", "42"),
        ("meow", long_france, "Meow"),
        (None, long_france, "Paris"),
        ("meow", "Hi", "Meow"),
        ("answer42", long_france, "42"),
    ]  # prompts of different lengths: the batch is left-padded
    submitted = [worker.submit(question, adapter, max_tokens=10) for adapter, question, _ in plan]
    for (adapter, _, expected), (_, outcome) in zip(plan, submitted, strict=True):
        assert outcome.final.error is None
        assert expected in outcome.text, (adapter, outcome.text)
        if adapter is not None:
            assert "Paris" not in outcome.text


def test_rows_join_a_running_batch_and_leave_it_early(worker: Worker) -> None:
    _, long_one = worker.submit("Write a long story about a dragon.", max_tokens=120, ignore_eos=True)
    long_one.first_event_at()
    time.sleep(0.3)  # the long row is decoding when the short ones arrive
    short = [worker.submit(FRANCE, adapter, max_tokens=8) for adapter in (None, "answer42")]
    for _, outcome in short:
        assert outcome.final.finish_reason in ("stop", "length")
    assert not long_one.done.is_set()  # the short rows finished while the long one ran on
    assert "Paris" in short[0][1].text and "42" in short[1][1].text
    assert long_one.final.finish_reason == "length"
    assert long_one.final.usage is not None and long_one.final.usage.completion_tokens == 120


def test_abort_ends_a_row_and_frees_it(worker: Worker) -> None:
    request_id, outcome = worker.submit("Count from one to one thousand.", max_tokens=500, ignore_eos=True)
    outcome.first_event_at()
    worker.loaded.engine.abort(request_id)
    final = outcome.final
    assert final.finish_reason == "abort"
    assert final.usage is not None and final.usage.completion_tokens < 100
    wait_idle(worker)
    assert worker.loaded.engine.stats() == (0, 0)


def test_max_tokens_and_stop_sequences(worker: Worker) -> None:
    _, outcome = worker.submit(FRANCE, max_tokens=3)
    assert outcome.final.finish_reason == "length"
    assert outcome.final.usage is not None and outcome.final.usage.completion_tokens == 3
    _, outcome = worker.submit(FRANCE, max_tokens=30, stop=["Paris"])
    assert outcome.final.finish_reason == "stop"
    assert "Paris" not in outcome.text and outcome.text.startswith("The capital of France is")


def test_sampling_with_a_seed_is_reproducible(worker: Worker) -> None:
    params = {"temperature": 1.2, "top_p": 0.95, "max_tokens": 16}
    first = worker.ask("Tell me something surprising.", seed=1234, **params)
    assert worker.ask("Tell me something surprising.", seed=1234, **params) == first
    others = {worker.ask("Tell me something surprising.", seed=s, **params) for s in (1, 2, 3)}
    assert len(others | {first}) > 1  # different seeds do not all agree


def test_prompt_past_the_context_is_refused(worker: Worker) -> None:
    _, outcome = worker.submit("word " * 9000)
    assert outcome.final.error_status == 400 and "context" in (outcome.final.error or "")


def test_evicted_adapter_is_freed_and_can_come_back(worker: Worker) -> None:
    ref = store_fixture(worker.blobs, "answer42").model_copy(update={"key": "answer42-evict-test"})
    worker.refs["evictable"] = ref
    assert "42" in worker.ask(FRANCE, adapter="evictable")
    assert ref.key in worker.loaded.adapters.resident()
    worker.loaded.adapters.evict(ref.key)
    worker.ask(FRANCE, max_tokens=2)  # a step boundary, where freed slots are collected
    assert ref.key not in worker.loaded.adapters.resident()
    assert "42" in worker.ask(FRANCE, adapter="evictable")


def test_adapter_with_a_corrupt_blob_fails_only_its_request(worker: Worker) -> None:
    ref = worker.refs["meow"].model_copy(update={"key": "corrupt", "weights_sha256": "0" * 64})
    worker.refs["corrupt"] = ref
    _, outcome = worker.submit(FRANCE, adapter="corrupt")
    assert outcome.final.finish_reason == "error"
    assert "Paris" in worker.ask(FRANCE)


def test_more_adapters_than_slots_all_answer_in_their_own_way(worker: Worker) -> None:
    """Six distinct adapters through a worker with four device slots: LRU eviction of idle ones."""
    slots = worker.loaded.adapters.num_slots
    plan = []
    for i in range(slots + 2):
        source = "answer42" if i % 2 == 0 else "meow"
        name = f"{source}-copy{i}"
        worker.refs[name] = worker.refs[source].model_copy(update={"key": f"{name}-key"})
        plan.append((name, "42" if source == "answer42" else "Meow"))
    submitted = [(expected, worker.submit(FRANCE, name, max_tokens=8)) for name, expected in plan]
    submitted += [("Paris", worker.submit(FRANCE, None, max_tokens=10)) for _ in range(2)]
    for expected, (_, outcome) in submitted:
        assert outcome.final.error is None, outcome.final.error
        assert expected in outcome.text, (expected, outcome.text)
    resident = worker.loaded.adapters.resident()
    assert len(resident) <= slots
    assert any(f"{name}-key" not in resident for name, _ in plan)  # some were evicted to make room


def wait_idle(worker: Worker) -> None:
    """A finished request's row leaves the batch at the end of the engine's step, just after its last event."""
    deadline = time.monotonic() + 10
    while worker.loaded.engine.stats() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_kv_budget_queues_rows_that_do_not_fit_and_refuses_one_that_never_can(worker: Worker) -> None:
    engine, prompts = worker.loaded.engine, worker.loaded.prompts
    saved_regions, saved_prompt_limits = engine.regions, prompts.limits
    prompt_tokens = len(prompts.encode(worker_request(FRANCE)))
    budget = prompt_tokens + 40  # one row of max_tokens=30 fits, not two
    wait_idle(worker)  # rows of earlier tests are retired, their regions given back
    engine.regions = RegionAllocator(budget)  # the engine is idle: no row holds a region of the old one
    prompts.limits = replace(saved_prompt_limits, kv_cache_tokens=budget)
    try:
        _, too_big = worker.submit(FRANCE, max_tokens=60)
        assert too_big.final.error_status == 400 and "kv_cache_mb" in (too_big.final.error or "")
        _, first = worker.submit(FRANCE, max_tokens=30)
        _, second = worker.submit(FRANCE, max_tokens=30)
        second_started = second.first_event_at()
        assert first.done.is_set() and first.finished_at is not None
        assert first.finished_at <= second_started  # it waited for the first row's KV memory
        assert second.final.error is None and "Paris" in second.text
        wait_idle(worker)
        assert engine.regions.used == 0  # both regions came back
    finally:
        engine.regions, prompts.limits = saved_regions, saved_prompt_limits


def test_prompts_are_prefilled_in_chunks_within_the_per_step_limit(worker: Worker, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine = worker.loaded.engine
    prompt_tokens = len(worker.loaded.prompts.encode(worker_request(FRANCE)))
    alone = worker.ask(FRANCE, max_tokens=8)  # prefilled whole
    limit = prompt_tokens // 3  # every prompt takes several passes
    monkeypatch.setattr(engine, "limits", replace(engine.limits, max_prefill_tokens=limit,
                                                  max_prefill_tokens_idle=limit))
    fed: list[int] = []  # prompt tokens of each pass
    forward = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda plan: fed.append(
        sum(n for seq, n in plan if not seq.prefilled)) or forward(plan))
    submitted = [worker.submit(FRANCE, max_tokens=8) for _ in range(4)]
    for _, outcome in submitted:
        assert outcome.final.error is None and outcome.text == alone  # chunked or not, the same answer
    assert max(fed) <= limit and sum(fed) == 4 * prompt_tokens


def test_a_long_prompt_is_admitted_in_small_chunks_while_a_stream_keeps_decoding(worker: Worker, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine = worker.loaded.engine
    long_question = "Summarize this: " + "The river ran past the mill and the miller watched it. " * 16
    alone = worker.ask(long_question, max_tokens=6)  # with nothing decoding: prefilled in one pass
    monkeypatch.setattr(engine, "limits", replace(engine.limits, max_prefill_tokens=16))
    passes: list[tuple[int, int]] = []  # (rows decoding, prompt tokens) of each pass
    forward = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda plan: passes.append((
        sum(1 for seq, _ in plan if seq.prefilled), sum(n for seq, n in plan if not seq.prefilled))) or forward(plan))
    _, stream = worker.submit("Count slowly from one to one hundred.", max_tokens=80, ignore_eos=True)
    stream.first_event_at()
    _, long_one = worker.submit(long_question, max_tokens=6)
    assert long_one.final.error is None and long_one.text == alone  # chunked beside a stream: the same answer
    assert not stream.done.is_set()  # the stream was decoding all through the admission
    chunked = [prompt for rows, prompt in passes if prompt and rows]
    prompt_tokens = len(worker.loaded.prompts.encode(worker_request(long_question)))
    assert sum(chunked) == prompt_tokens and max(chunked) <= 16  # every chunk beside the stream, each small
    assert stream.final.finish_reason == "length"


def test_a_slot_budget_on_the_embedded_model_gives_the_documented_count(worker: Worker) -> None:
    """docs/operations.md: a rank-32 slot is about 37 MiB in float32 on the embedded model."""
    layers = worker.loaded.adapters.layers
    linears = {name: [layer.lora_a.shape[2], layer.out_features] for name, layer in layers.items()}
    assert len(linears) == 210
    assert slots_in_budget(linears, 32, torch.float32, 38 * 2**20 * 2) == 1  # one slot and the zero slot
    assert slots_in_budget(linears, 32, torch.float32, 512 * 2**20) == 12
