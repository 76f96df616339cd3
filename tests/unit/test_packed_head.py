"""The worker's packed output projection: the same logits as the dense one, and only where it applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.model import PackedHead, pack_output_head

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def tiny_llama(tied: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_a_packed_head_gives_the_dense_heads_logits_and_leaves_the_embedding_alone(tied: bool) -> None:
    model = tiny_llama(tied)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        embedding = model.get_input_embeddings().weight.clone()
        assert pack_output_head(model)
        assert isinstance(model.get_output_embeddings(), PackedHead)
        packed = model(input_ids=ids).logits
        kept = model(input_ids=ids, logits_to_keep=torch.tensor([0, 4, 8])).logits  # the engine's due rows
    torch.testing.assert_close(packed, dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kept, dense[:, [0, 4, 8]], rtol=1e-4, atol=1e-5)
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert packed.argmax(-1).tolist() == dense.argmax(-1).tolist()


@pytest.mark.parametrize("rows", [1, 16, 70])
def test_a_packed_head_takes_any_number_of_rows(rows: int) -> None:
    linear = nn.Linear(48, 500, bias=False)
    head = PackedHead(linear.weight)
    x = torch.randn(rows, 48)
    with torch.no_grad():
        torch.testing.assert_close(head(x), linear(x), rtol=1e-4, atol=1e-5)


def test_a_head_that_does_not_fit_stays_dense() -> None:
    half = tiny_llama(dtype=torch.bfloat16)  # not float32
    assert not pack_output_head(half) and isinstance(half.get_output_embeddings(), nn.Linear)
    biased = tiny_llama(tied=False)
    biased.set_output_embeddings(nn.Linear(32, 300, bias=True))
    assert not pack_output_head(biased) and isinstance(biased.get_output_embeddings(), nn.Linear)


def test_a_packed_head_that_disagrees_with_the_dense_one_on_the_probe_is_not_used(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = tiny_llama()
    dense = model.get_output_embeddings()
    monkeypatch.setattr(PackedHead, "forward", lambda self, x: torch.zeros(*x.shape[:-1], self.out_features))
    assert not pack_output_head(model)
    assert model.get_output_embeddings() is dense
