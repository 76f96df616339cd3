"""A training step's memory follows padded tokens, not the tenant's batch_size: micro-batches whose
accumulated gradients are the full batch's (on a tiny random Llama; the real model trains in e2e)."""

from __future__ import annotations

import random

import pytest
import torch

from worker.finetune import accumulate, batch, micro_batches

Rows = list[tuple[list[int], list[int]]]


def rows(count: int, seed: int = 0) -> Rows:
    """Examples of 3-40 tokens whose first half is prompt (label -100) and the rest answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ids = [rng.randrange(1, 100) for _ in range(rng.randrange(3, 41))]
        out.append((ids, [-100] * (len(ids) // 2) + ids[len(ids) // 2:]))
    return out


@pytest.mark.parametrize("max_tokens", [1, 16, 64, 10_000])
def test_micro_batches_keep_every_row_in_order_under_the_token_bound(max_tokens: int) -> None:
    examples = rows(30)
    chunks = micro_batches(examples, max_tokens)
    assert [row for chunk in chunks for row in chunk] == examples
    for chunk in chunks:
        assert len(chunk) == 1 or len(chunk) * max(len(ids) for ids, _ in chunk) <= max_tokens
    if max_tokens == 10_000:
        assert len(chunks) == 1


def test_a_batch_in_micro_batches_has_the_gradients_of_one_pass() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    examples = rows(12, seed=1)

    def gradients(max_tokens: int) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = accumulate(model, examples, 0, torch.device("cpu"), max_tokens)
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole_loss, whole = gradients(10_000)
    assert len(micro_batches(examples, 40)) > 6  # really cut up
    cut_loss, cut = gradients(40)
    with torch.no_grad():
        one_pass = float(model(**batch(examples, 0, torch.device("cpu"))).loss)
    assert whole_loss == pytest.approx(one_pass, rel=1e-5)
    assert cut_loss == pytest.approx(one_pass, rel=1e-5)
    assert len(cut) == len(whole) > 0
    for a, b in zip(cut, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
