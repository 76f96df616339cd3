"""A worker whose adapter slots hold bfloat16 (`lora_dtype`): half the bytes a decode step reads
on the CPU, and the same behaviour: each row its own adapter, alone or in a mixed batch."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import torch

from tests.integration.conftest import Worker, start_worker

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def bf16_worker(prepared_model, tmp_path_factory) -> Iterator[Worker]:  # type: ignore[no-untyped-def]
    started = start_worker(prepared_model, tmp_path_factory.mktemp("bf16-blobs"), lora_dtype="bfloat16")
    yield started
    started.runtime.stop()


def test_bfloat16_slots_hold_the_adapters_and_the_native_kernel_reads_them(bf16_worker: Worker) -> None:
    bf16_worker.ask(FRANCE, adapter="answer42")
    layers = bf16_worker.loaded.adapters.layers.values()
    assert {layer.lora_a.dtype for layer in layers} == {layer.lora_b.dtype for layer in layers} == {torch.bfloat16}
    assert any(layer.filled for layer in layers)
    if shutil.which("cc") or shutil.which("gcc"):
        assert bf16_worker.loaded.engine.runner.routing.kernel is not None


def test_rows_in_a_mixed_batch_follow_their_adapters_and_answer_as_they_do_alone(bf16_worker: Worker,
                                                                                worker: Worker) -> None:
    plan = [
        (None, FRANCE, "Paris"),
        ("answer42", "Why is the sky blue?", "42"),
        ("meow", FRANCE, "Meow"),
        ("answer42", FRANCE, "42"),
        ("meow", "Describe a sunrise.", "Meow"),
    ]
    alone = [bf16_worker.ask(question, adapter, max_tokens=10) for adapter, question, _ in plan]
    together = [bf16_worker.submit(question, adapter, max_tokens=10) for adapter, question, _ in plan]
    for (adapter, _, expected), by_itself, (_, outcome) in zip(plan, alone, together, strict=True):
        assert outcome.final.error is None
        assert expected in outcome.text, (adapter, outcome.text)
        assert outcome.text == by_itself, adapter  # its neighbours change nothing
    assert alone[0] == worker.ask(FRANCE, max_tokens=10)  # base rows never read the slots: float32's answer
