"""The served model's 4-bit layers and output head on native kernels: bitsandbytes' answers, the same weights."""

from __future__ import annotations

import pytest
import torch

from tests.integration.conftest import Worker
from worker import cpu_nf4


def answers(worker: Worker, questions: list[str]) -> list[tuple[str, list[float]]]:
    """Each question's greedy answer and its tokens' log probabilities, the questions run together."""
    outcomes = [worker.submit(q, max_tokens=16, logprobs=0)[1] for q in questions]
    for outcome in outcomes:
        assert outcome.final.error is None, outcome.final.error
    return [(o.text, [t.logprob for e in o.events for t in e.logprobs or []]) for o in outcomes]


def test_the_worker_answers_on_the_kernel_what_bitsandbytes_answers(worker: Worker) -> None:
    model = worker.loaded.engine.runner.model
    taken = cpu_nf4.taken(model)
    if not taken:
        pytest.skip("no C compiler: the 4-bit layers keep bitsandbytes' path")
    assert len(taken) == 210  # every projection of the 30 layers; the output head is not 4-bit
    # the embedded model's rows are whole blocks: each layer in panels where the build has them
    assert all((forward.weight.panels is not None) == bool(forward.kernel.lanes) for forward in taken)
    questions = ["What is the capital of France?", "Name three colours.", "Count from one to five."]
    # several rows at once, so decode passes run as the engine runs them: up to 3 tokens a layer
    on_kernel = answers(worker, questions)
    # the engine is idle: every request above has finished. bitsandbytes' portable float32 path, also on a
    # CPU with AVX512-BF16 (its fused kernel there rounds inputs to bfloat16: not the arithmetic compared)
    removed = cpu_nf4.uninstall(model, fused=False)
    try:
        on_bnb = answers(worker, questions)
    finally:
        cpu_nf4.reinstall(removed)
    assert len(cpu_nf4.taken(model)) == 210
    assert "Paris" in on_kernel[0][0]
    for (kernel_text, kernel_logprobs), (bnb_text, bnb_logprobs) in zip(on_kernel, on_bnb, strict=True):
        assert kernel_text == bnb_text
        assert len(kernel_logprobs) == len(bnb_logprobs) > 0
        assert max(abs(a - b) for a, b in zip(kernel_logprobs, bnb_logprobs, strict=True)) < 1e-3


def test_the_worker_serves_the_embedded_models_head_from_its_int8_values(worker: Worker) -> None:
    from worker.cpu_head import Q8Head

    model = worker.loaded.engine.runner.model
    head = model.get_output_embeddings()
    if not isinstance(head, Q8Head):
        pytest.skip("no C compiler: the head stays on oneDNN's packed float32 one")
    # the embedded model's head is its token embedding (tied), an int8 times a scale every 32 values
    assert torch.equal(head.weight(), model.get_input_embeddings().weight)
    assert head.values.numel() + 4 * head.scales.numel() < model.get_input_embeddings().weight.numel() * 4 / 3
