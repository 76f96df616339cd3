"""The base model's RMS normalization layers in one native call each: transformers' result, a row's
values independent of the rows beside it, and only for layers whose class computes what the kernel does."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from worker import cpu_norm
from worker.cpu_norm import NormForward, RmsNorm, rms_norm_kernel

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the norms stay on transformers' forward")


@pytest.fixture(scope="module")
def kernel() -> RmsNorm:
    built = rms_norm_kernel()
    assert built is not None, "a host with a C compiler builds the kernel"
    return built


def llama_norm(n: int, seed: int, eps: float = 1e-5) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(n, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=torch.Generator().manual_seed(seed)))
    return norm


@pytest.mark.parametrize("n", [1, 7, 16, 64, 576, 577])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_kernel_gives_transformers_norm(kernel: RmsNorm, n: int, threads: int) -> None:
    norm = llama_norm(n, 1, eps=1e-6)
    x = torch.randn(300, n, generator=torch.Generator().manual_seed(2)) * 5
    x[3] = 0.0  # a row of zeros: eps alone under the root, zeros out
    x[4] *= 1e-4
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for tokens in (1, 2, 17, 300):  # 300 x 577: above the values from which rows are spread over threads
                expected = norm(x[:tokens])
                got = kernel.forward(x[:tokens], norm.weight.detach(), 1e-6)
                torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
        assert torch.equal(kernel.forward(x[3:4], norm.weight.detach(), 1e-6), torch.zeros(1, n))
    finally:
        torch.set_num_threads(2)


def test_a_rows_result_does_not_depend_on_the_rows_beside_it(kernel: RmsNorm) -> None:
    weight = llama_norm(576, 3).weight.detach()
    x = torch.randn(2048, 576, generator=torch.Generator().manual_seed(4))
    together = kernel.forward(x, weight, 1e-5)  # a prompt chunk: rows spread over the threads
    for row in (0, 1, 1000, 2047):
        assert torch.equal(kernel.forward(x[row : row + 1], weight, 1e-5)[0], together[row]), row
    for count in (2, 5, 16, 64):
        assert torch.equal(kernel.forward(x[:count], weight, 1e-5), together[:count]), count
    # a strided row (a view of a wider tensor) and a 3-d batch give the same bits
    wide = torch.zeros(2048, 600)
    wide[:, :576] = x
    assert torch.equal(kernel.forward(wide[:, :576], weight, 1e-5), together)
    assert torch.equal(kernel.forward(x.view(2, 1024, 576), weight, 1e-5).view(2048, 576), together)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.copy_(torch.rand(64) + 0.5)  # not the ones a fresh model starts with
    return model


def test_a_llamas_norms_take_the_kernel_with_its_logits(kernel: RmsNorm, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert cpu_norm.install(model) == 2 * 2 + 1  # two a decoder layer and the last
        taken = cpu_norm.taken(model)
        assert len(taken) == 5
        with monkeypatch.context() as patched:  # the kernel computed every norm, not transformers
            for forward in taken:
                patched.setattr(forward, "original", must_not_run)
            after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert after.argmax(-1).tolist() == before.argmax(-1).tolist()
    with torch.enable_grad():  # gradients (training): transformers' own forward, its bits
        norm = model.model.norm
        x = torch.randn(3, 64, requires_grad=True)
        assert torch.equal(norm(x), type(norm).forward(norm, x))


def must_not_run(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("transformers' forward ran where the kernel should have")


def test_inputs_the_kernel_does_not_take_go_to_the_layers_own_forward(kernel: RmsNorm) -> None:
    norm = llama_norm(64, 5)
    model = nn.Sequential(norm)
    assert cpu_norm.install(model) == 1
    assert isinstance(norm.forward, NormForward)
    with torch.no_grad():
        # float64; rows of a wider tensor; a transposed one (its last dimension strided)
        for odd in (torch.randn(4, 64, dtype=torch.float64), torch.randn(4, 80)[:, :64], torch.randn(64, 4).t()):
            assert torch.equal(norm(odd), type(norm).forward(norm, odd))
        with pytest.raises(RuntimeError):
            norm(torch.randn(2, 63))  # the wrong width is transformers' own error, not 64 values read from 63


class GemmaStyleRMSNorm(nn.Module):
    """An RMSNorm whose scale is 1 + weight (Gemma's): the kernel's probe must turn it down."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class FloatingPointRMSNorm(nn.Module):
    """An RMSNorm with no epsilon attribute the kernel knows: left alone without a probe."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x


def test_norms_that_compute_otherwise_keep_their_forward(kernel: RmsNorm) -> None:
    model = nn.Sequential(GemmaStyleRMSNorm(64), GemmaStyleRMSNorm(64), FloatingPointRMSNorm(64),
                          nn.LayerNorm(64), llama_norm(64, 7))
    assert cpu_norm.install(model) == 1  # the Llama one only
    assert [type(forward.original.__self__) for forward in cpu_norm.taken(model)] == [LlamaRMSNorm]
    assert all("forward" not in module.__dict__ for module in list(model)[:4])
    half = llama_norm(64, 8).to(torch.bfloat16)  # not float32: its own forward
    assert cpu_norm.install(nn.Sequential(half)) == 0
