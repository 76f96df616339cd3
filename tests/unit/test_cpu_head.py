"""The output projection from a narrower exact form of its float32 weight (int8 times a scale a run, or
bfloat16): the float32 head's values from fewer bytes, and only where they are."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from worker.cpu_head import (
    BLOCK,
    Bf16Head,
    HeadKernel,
    PanelHead,
    Q8Head,
    bf16_form,
    head_kernel,
    install_panel_head,
    panel_form,
    q8_form,
)

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the head stays on oneDNN's packed float32 one")
FORMS = {"int8": Q8Head, "bfloat16": Bf16Head}


@pytest.fixture(scope="module")
def kernel() -> HeadKernel:
    built = head_kernel()
    assert built is not None, "a host with a C compiler builds the kernel"
    return built


def q8_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A float32 weight that is an int8 times a float16 scale every 32 values, as a GGUF Q8_0 tensor decodes."""
    generator = torch.Generator().manual_seed(seed)
    steps = torch.randint(-127, 128, (out_features, in_features // BLOCK, BLOCK), generator=generator)
    steps[..., 0] = 127  # the run's largest magnitude: the scale is that / 127, as Q8_0 sets it
    scales = (torch.rand(out_features, in_features // BLOCK, 1, generator=generator) / 100).half().float()
    return (steps.float() * scales).reshape(out_features, in_features)


def bf16_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A float32 weight as a bfloat16 checkpoint loaded in float32 holds it."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(out_features, in_features, generator=generator) / 20).bfloat16().float()


WEIGHTS = {"int8": q8_weight, "bfloat16": bf16_weight}


def served(kernel: HeadKernel, form: str, weight: torch.Tensor) -> PanelHead:
    """`weight`'s head in `form`, which it must be in."""
    make = panel_form(weight)
    assert make is not None
    head = make(kernel)
    assert isinstance(head, FORMS[form])
    return head


def test_the_int8_form_is_found_value_for_value_and_only_where_it_holds() -> None:
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


def test_the_bfloat16_form_is_found_value_for_value_and_only_where_it_holds(kernel: HeadKernel) -> None:
    weight = bf16_weight(50, 83, 0)  # any width: no runs
    weight[4] = 0.0
    values = bf16_form(weight)
    assert values is not None and values.dtype == torch.bfloat16
    assert torch.equal(values.float(), weight)
    off = weight.clone()
    off[49, 82] = torch.nextafter(off[49, 82], torch.tensor(1.0))  # one float32 step off a bfloat16 value
    assert bf16_form(off) is None
    assert bf16_form(torch.randn(50, 96)) is None  # a float32 head as trained
    assert bf16_form(weight.double()) is None
    for bad in (float("inf"), float("nan")):
        broken = weight.clone()
        broken[7, 7] = bad
        assert bf16_form(broken) is None
    # a head in both forms takes the int8 one: fewer bytes
    both = (torch.randint(-127, 128, (40, 64), generator=torch.Generator().manual_seed(1)).float() / 64)
    both[:, ::BLOCK] = 127 / 64  # each run's largest magnitude: its scale is 1 / 64, a power of two
    assert q8_form(both) is not None and bf16_form(both) is not None
    assert isinstance(served(kernel, "int8", both), Q8Head)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize(("out_features", "in_features"), [(49, 576), (16, 32), (5, 64), (300, 96)])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_gives_the_float32_heads_product(kernel: HeadKernel, form: str, out_features: int,
                                                     in_features: int, threads: int) -> None:
    weight = WEIGHTS[form](out_features, in_features + (form == "bfloat16"), out_features)  # and an odd width
    head = served(kernel, form, weight)
    assert torch.equal(head.weight(), weight)  # the stored float32 values, each of them
    x = torch.randn(40, weight.shape[1], generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for tokens in (1, 2, 7, 8, 9, 11, 12, 13, 25, 40):
                got = head(x[:tokens])
                expected = torch.nn.functional.linear(x[:tokens], weight)
                scale = float(expected.abs().max()) + 1.0
                assert (got - expected).abs().max() <= 2e-6 * scale * in_features**0.5, tokens
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("form", list(FORMS))
def test_a_tokens_logits_do_not_depend_on_the_tokens_beside_it(kernel: HeadKernel, form: str) -> None:
    head = served(kernel, form, WEIGHTS[form](70, 576, 3))
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


def tiny_llama(tied: bool, head: torch.Tensor | None = None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(q8_weight(300, 64, 5) if head is None else head)
    return model


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("tied", [True, False])
def test_a_model_whose_head_is_in_a_form_gets_that_head_with_its_logits(kernel: HeadKernel, form: str,
                                                                        tied: bool) -> None:
    model = tiny_llama(tied, WEIGHTS[form](300, 64, 5))
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        embedding = model.get_input_embeddings().weight.clone()
        head = install_panel_head(model)
        assert isinstance(head, FORMS[form]) and model.get_output_embeddings() is head
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, dense, rtol=1e-5, atol=1e-5)
    assert logits.argmax(-1).tolist() == dense.argmax(-1).tolist()
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    with torch.enable_grad():  # gradients: the decoded weight in torch's product
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)


def test_heads_in_no_form_are_left_alone() -> None:
    model = tiny_llama(tied=False)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_()
    head = model.get_output_embeddings()
    assert install_panel_head(model) is None and model.get_output_embeddings() is head
    biased = tiny_llama(tied=False)
    biased.set_output_embeddings(nn.Linear(64, 300, bias=True))
    assert install_panel_head(biased) is None
    half = tiny_llama(tied=True).to(torch.bfloat16)
    assert install_panel_head(half) is None


@pytest.mark.parametrize("tied", [True, False])
def test_a_bfloat16_checkpoint_loaded_as_a_base_model_gets_the_bfloat16_head(kernel: HeadKernel, tmp_path: Path,
                                                                              tied: bool) -> None:
    """The form's premise: a checkpoint saved in bfloat16, loaded as the worker loads a base model (float32
    compute, its linears in NF4), has a float32 head whose every value is a bfloat16."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from worker.model import load_base_model

    tiny_llama(tied, bf16_weight(300, 64, 5)).to(torch.bfloat16).save_pretrained(tmp_path)
    vocabulary = models.WordLevel({f"t{i}": i for i in range(300)}, unk_token="t0")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(vocabulary)).save_pretrained(tmp_path)
    model, _ = load_base_model(tmp_path, torch.device("cpu"))
    assert model.get_output_embeddings().weight.dtype == torch.float32
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        assert isinstance(install_panel_head(model), Bf16Head)
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, dense, rtol=1e-5, atol=1e-5)
