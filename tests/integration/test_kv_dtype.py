"""A worker whose KV pool stores bfloat16 (`kv_cache_dtype`, opt-in on the CPU): twice the positions in
the same memory, each key and value rounded once as it is written and attended in float32."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from tests.integration.conftest import Outcome, Worker, start_worker, worker_request
from worker.cpu_attention import decode_attention_kernel
from worker.engine import kv_bytes_per_token

KV_MB = 40
FRANCE = "What is the capital of France?"
# ~1,000 tokens: more than a float32 pool of KV_MB holds (910 positions on the embedded model)
LONG = "Here are some numbers: " + ", ".join(str(n) for n in range(300, 495)) + ". Which number came first?"


@pytest.fixture(scope="module")
def bf16_kv_worker(prepared_model, tmp_path_factory) -> Iterator[Worker]:  # type: ignore[no-untyped-def]
    started = start_worker(prepared_model, tmp_path_factory.mktemp("kv-blobs"), kv_cache_dtype="bfloat16",
                           kv_cache_mb=KV_MB)
    yield started
    started.runtime.stop()


def float32_positions(worker: Worker) -> int:
    return KV_MB * 2**20 // kv_bytes_per_token(worker.loaded.engine.runner.model.config, torch.float32)


def test_the_pool_holds_twice_the_positions_and_serves_a_prompt_float32_could_not_hold(bf16_kv_worker: Worker) -> None:
    pool = bf16_kv_worker.loaded.engine.runner.kv
    assert pool.dtype == torch.bfloat16 and pool.compute == torch.float32
    assert (pool.decode_kernel is not None) == (decode_attention_kernel() is not None)
    positions = bf16_kv_worker.loaded.engine.limits.kv_cache_tokens
    assert positions == pool.positions == 2 * float32_positions(bf16_kv_worker)
    prepared = bf16_kv_worker.loaded.prompts.prepare(worker_request(LONG, max_tokens=8))
    assert float32_positions(bf16_kv_worker) < len(prepared.ids) + 8 < pool.positions
    _, outcome = bf16_kv_worker.submit(LONG, max_tokens=8)
    assert outcome.final.error is None and outcome.final.finish_reason == "length" and outcome.text.strip()


def test_rows_in_a_mixed_batch_follow_their_adapters_and_answer_as_they_do_alone(bf16_kv_worker: Worker) -> None:
    plan = [
        (None, FRANCE, "Paris"),
        ("answer42", "Why is the sky blue?", "42"),
        ("meow", FRANCE, "Meow"),
        ("answer42", LONG, "42"),
    ]
    alone = [bf16_kv_worker.ask(question, adapter, max_tokens=10) for adapter, question, _ in plan]
    together = [bf16_kv_worker.submit(question, adapter, max_tokens=10) for adapter, question, _ in plan]
    for (adapter, _, expected), by_itself, (_, outcome) in zip(plan, alone, together, strict=True):
        assert outcome.final.error is None, outcome.final.error
        assert expected in outcome.text, (adapter, outcome.text)
        assert outcome.text == by_itself, adapter  # its neighbours change nothing


def scored(worker: Worker, text: str) -> list[tuple[float, str]]:
    """Every token of `text` scored given the ones before it: (log probability, the most likely token)."""
    request = worker_request("", max_tokens=1, prompt_logprobs=1).model_copy(update={"messages": None, "prompt": text})
    prepared = worker.loaded.prompts.prepare(request)
    outcome = Outcome()
    worker.loaded.engine.submit(request, prepared.ids, outcome.sink, prepared.matcher)
    assert outcome.final.error is None
    prompt = next(e.prompt_logprobs for e in outcome.events if e.prompt_logprobs)
    return [(p.logprob, p.top[0].token) for p in prompt if p.logprob is not None]


def test_rounding_the_keys_moves_a_long_texts_scores_by_little(worker: Worker, bf16_kv_worker: Worker) -> None:
    """Teacher-forced over ~1,000 tokens (prefilled in chunks that attend the stored keys): the float32
    worker's scores against the bfloat16 pool's."""
    exact, rounded = scored(worker, LONG), scored(bf16_kv_worker, LONG)
    assert len(exact) == len(rounded) > 900
    moved = sorted(abs(a - b) for (a, _), (b, _) in zip(exact, rounded, strict=True))
    flips = sum(x != y for (_, x), (_, y) in zip(exact, rounded, strict=True))
    assert all(math.isfinite(m) for m in moved)
    # rounded, so not equal; but by little (measured: mean 0.7 millinats, max 25, no most likely token changed)
    assert 0 < sum(moved) / len(moved) < 0.01
    assert flips <= len(moved) // 50
