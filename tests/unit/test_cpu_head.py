"""The int8 output projection: the float32 head's values from a third of the bytes, and only where they are."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from worker.cpu_head import BLOCK, Q8Head, Q8Kernel, install_q8_head, q8_form, q8_head_kernel

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the head stays on oneDNN's packed float32 one")


@pytest.fixture(scope="module")
def kernel() -> Q8Kernel:
    built = q8_head_kernel()
    assert built is not None, "a host with a C compiler builds the kernel"
    return built


def q8_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A float32 weight that is an int8 times a float16 scale every 32 values, as a GGUF Q8_0 tensor decodes."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.randint(-127, 128, (out_features, in_features // BLOCK, BLOCK), generator=generator)
    steps[..., 0] = 127  # the run's largest magnitude: the scale is that / 127, as Q8_0 sets it
    scales = (torch.rand(out_features, in_features // BLOCK, 1, generator=generator) / 100).half().float()
    return (steps.float() * scales).reshape(out_features, in_features)


def test_the_form_is_found_value_for_value_and_only_where_it_holds() -> None:
    weight = q8_weight(50, 96, 0)
    weight[3, 32:64] = 0.0  # a zero run
    form = q8_form(weight)
    assert form is not None
    values, scales = form
    assert values.dtype == torch.int8 and scales.shape == (50, 3)
    assert torch.equal((values.float().view(50, 3, BLOCK) * scales[..., None]).view(50, 96), weight)
    off = weight.clone()
    off[49, 95] = torch.nextafter(off[49, 95], torch.tensor(1.0))  # one value a step off an int8 multiple
    assert q8_form(off) is None
    assert q8_form(torch.randn(50, 96)) is None  # a float32 head as trained
    assert q8_form(weight[:, :80]) is None  # rows not whole runs
    assert q8_form(weight.double()) is None
    infinite = weight.clone()
    infinite[0, 0] = float("inf")
    assert q8_form(infinite) is None


@pytest.mark.parametrize(("out_features", "in_features"), [(49, 576), (16, 32), (5, 64), (300, 96)])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_gives_the_float32_heads_product(kernel: Q8Kernel, out_features: int, in_features: int,
                                                     threads: int) -> None:
    weight = q8_weight(out_features, in_features, out_features)
    form = q8_form(weight)
    assert form is not None
    head = Q8Head(kernel, *form)
    assert torch.equal(head.weight(), weight)  # the stored float32 values, each of them
    x = torch.randn(40, in_features, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for tokens in (1, 2, 11, 12, 13, 25, 40):
                got = head(x[:tokens])
                expected = torch.nn.functional.linear(x[:tokens], weight)
                scale = float(expected.abs().max()) + 1.0
                assert (got - expected).abs().max() <= 2e-6 * scale * in_features**0.5, tokens
    finally:
        torch.set_num_threads(2)


def test_a_tokens_logits_do_not_depend_on_the_tokens_beside_it(kernel: Q8Kernel) -> None:
    form = q8_form(q8_weight(70, 576, 3))
    assert form is not None
    head = Q8Head(kernel, *form)
    x = torch.randn(30, 576, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        together = head(x)
        for token in (0, 11, 12, 29):
            assert torch.equal(head(x[token : token + 1])[0], together[token]), token
        for count in range(2, 27):
            assert torch.equal(head(x[:count]), together[:count]), count
        wide = torch.zeros(2, 15, 600)  # a strided 3-d input: the same bits
        wide[..., :576] = x.view(2, 15, 576)
        assert torch.equal(head(wide[..., :576]).reshape(30, 70), together)


def tiny_llama(tied: bool) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(q8_weight(300, 64, 5))
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_a_model_whose_head_is_in_the_form_gets_the_int8_head_with_its_logits(kernel: Q8Kernel, tied: bool) -> None:
    model = tiny_llama(tied)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        embedding = model.get_input_embeddings().weight.clone()
        assert install_q8_head(model)
        assert isinstance(model.get_output_embeddings(), Q8Head)
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, dense, rtol=1e-5, atol=1e-5)
    assert logits.argmax(-1).tolist() == dense.argmax(-1).tolist()
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    with torch.enable_grad():  # gradients: the decoded weight in torch's product
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_heads_not_in_the_form_are_left_alone() -> None:
    model = tiny_llama(tied=False)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_()
    head = model.get_output_embeddings()
    assert not install_q8_head(model) and model.get_output_embeddings() is head
    biased = tiny_llama(tied=False)
    biased.set_output_embeddings(nn.Linear(64, 300, bias=True))
    assert not install_q8_head(biased)
    half = tiny_llama(tied=True).to(torch.bfloat16)
    assert not install_q8_head(half)
