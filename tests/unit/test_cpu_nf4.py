"""The native 4-bit linear layer: what bitsandbytes computes, for any token count, and only where it should."""

from __future__ import annotations

import shutil

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

from worker import cpu_nf4
from worker.cpu_nf4 import KernelForward, Nf4Linear, PackedWeight, nf4_linear_kernel, reference_weight

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the layers keep bitsandbytes' path")


@pytest.fixture(scope="module")
def kernel() -> Nf4Linear:
    built = nf4_linear_kernel()
    assert built is not None, "a host with a C compiler builds the kernel"
    return built


def packed(out_features: int, in_features: int, blocksize: int, quant_type: str, bias: bool,
           seed: int) -> tuple[PackedWeight, torch.Tensor]:
    """A random weight packed by bitsandbytes, as the kernel reads it, and its values by the format's definition."""
    generator = torch.Generator().manual_seed(seed)
    weight, state = F.quantize_4bit(torch.randn(out_features, in_features, generator=generator), blocksize=blocksize,
                                    quant_type=quant_type)
    bias_values = torch.randn(out_features, generator=generator) if bias else None
    packed_weight = PackedWeight.quantized(weight, state, bias_values)
    return packed_weight, reference_weight(packed_weight)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_reference_reads_bitsandbytes_format(quant_type: str) -> None:
    # rows of whole blocks: bitsandbytes' AVX-512 dequantization indexes its blocks by row
    generator = torch.Generator().manual_seed(7)
    weight, state = F.quantize_4bit(torch.randn(48, 192, generator=generator), blocksize=64, quant_type=quant_type)
    packed_weight = PackedWeight.quantized(weight, state)
    assert torch.allclose(reference_weight(packed_weight), F.dequantize_4bit(weight, state).float(), rtol=1e-6, atol=0)


def laid_out(kernel: Nf4Linear, weight: PackedWeight, layout: str) -> PackedWeight:
    """The weight as the kernel reads it in `layout`: bitsandbytes' rows, or its panels (where it has them)."""
    if layout == "rows":
        return weight
    prepared = kernel.prepare(weight)
    if kernel.lanes and weight.in_features % weight.blocksize == 0:
        assert prepared.panels is not None
        lanes = kernel.lanes
        assert prepared.panels.bytes.shape == (-(-weight.out_features // lanes), weight.in_features // 2, lanes)
    else:  # blocks that run across rows: the panel path reads one scale a block a row, so the rows serve
        assert prepared is weight
    return prepared


@pytest.mark.parametrize(("out_features", "in_features", "blocksize"),
                         [(576, 576, 64), (7, 96, 64), (13, 130, 64), (5, 1536, 256), (3, 2, 64), (33, 10, 128),
                          (40, 192, 64), (17, 64, 64)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["rows", "panels"])
def test_the_kernel_gives_bitsandbytes_layer(kernel: Nf4Linear, out_features: int, in_features: int, blocksize: int,
                                             quant_type: str, threads: int, layout: str) -> None:
    # blocks of the flattened weight that run across rows (96, 130, 10 inputs), odd outputs, tails past the lanes;
    # panels: whole ones, a last one part full (40, 17, 13 rows), one alone (5, 7)
    weight, dense = packed(out_features, in_features, blocksize, quant_type, out_features % 2 == 1, out_features)
    weight = laid_out(kernel, weight, layout)
    x = torch.randn(cpu_nf4.MAX_TOKENS, in_features, generator=torch.Generator().manual_seed(1))
    torch.set_num_threads(threads)
    try:
        assert torch.equal(kernel.dequantize(weight), dense)  # bitsandbytes' values, each of them
        for tokens in (1, 2, 3, 5, 8, 9, 12, 13, 16, 25, cpu_nf4.MAX_TOKENS):
            got = kernel.forward(x[:tokens], weight)
            expected = torch.nn.functional.linear(x[:tokens], dense, weight.bias)
            scale = float(expected.abs().max()) + 1.0
            assert (got - expected).abs().max() <= 2e-6 * scale * in_features**0.5, tokens
    finally:
        torch.set_num_threads(2)


@pytest.mark.parametrize("layout", ["rows", "panels"])
def test_a_tokens_result_does_not_depend_on_the_tokens_beside_it(kernel: Nf4Linear, layout: str) -> None:
    weight = laid_out(kernel, packed(40, 576, 64, "nf4", True, 3)[0], layout)
    x = torch.randn(cpu_nf4.MAX_TOKENS, 576, generator=torch.Generator().manual_seed(4))
    together = kernel.forward(x, weight)
    for token in (0, 1, 5, cpu_nf4.MAX_TOKENS - 1):
        alone = kernel.forward(x[token : token + 1], weight)
        assert torch.equal(alone[0], together[token]), token  # bit for bit, whatever the tile
    # every tail of a tile of up to 12 tokens, more than one tile, and passes that decode each panel once (from
    # 3 tiles: 24 tokens with AVX2, 36 with AVX-512) with a last tile full or part full
    for count in (*range(2, 26), 36, 37, 47, 48, 50):
        assert torch.equal(kernel.forward(x[:count], weight), together[:count]), count
    # strided input (a view of a wider tensor) and a 3-d batch give the same bits
    wide = torch.zeros(2, cpu_nf4.MAX_TOKENS // 2, 600)
    wide[..., :576] = x.view(2, cpu_nf4.MAX_TOKENS // 2, 576)
    assert torch.equal(kernel.forward(wide[..., :576], weight).reshape(-1, 40), together)


def bnb_layer(quant_type: str, nested: bool, bias: bool = True) -> bnb.nn.Linear4bit:
    torch.manual_seed(5)
    dense = torch.nn.Linear(192, 48, bias=bias)
    layer = bnb.nn.Linear4bit(192, 48, bias=bias, compute_dtype=torch.float32, quant_type=quant_type,
                              compress_statistics=nested)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu").eval()
    # bitsandbytes' portable float32 path on every host (on a CPU with AVX512-BF16 it would repack the weight
    # for its bfloat16 kernel on the first call): the arithmetic the kernel's results are held to
    layer.support_avx512bf16_for_cpu = False
    return layer


def bitsandbytes_must_not_run(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("bitsandbytes' own forward ran where the kernel should have")


@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", False), ("nf4", True), ("fp4", True)])
def test_an_installed_layer_takes_the_kernel_for_few_tokens_and_bitsandbytes_arithmetic_for_more(
        kernel: Nf4Linear, quant_type: str, nested: bool) -> None:
    layer = bnb_layer(quant_type, nested)
    model = torch.nn.Sequential(layer)
    x = torch.randn(cpu_nf4.MAX_TOKENS + 1, 192, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = layer(x)  # bitsandbytes' own path, before install
        # the same 4 tokens by themselves: torch's matmul may sum a row differently beside 96 others than
        # beside 3 (it did on an Intel Xeon with AVX-512), so the layer's own path is compared on the same batch
        before_few = layer(x[:4])
        assert cpu_nf4.install(model) == 1
        assert isinstance(layer.forward, KernelForward)
        original = layer.forward.original
        layer.forward.original = bitsandbytes_must_not_run
        few = layer(x[:4])  # the kernel ran, not bitsandbytes (whose matmul may sum in the kernel's order)
        layer.forward.original = original
        assert (few - before_few).abs().max() < 1e-4  # nested statistics dequantized as bitsandbytes does
        assert isinstance(layer.forward, KernelForward)
        dense = reference_weight(layer.forward.weight)
        assert torch.equal(layer.forward.kernel.dequantize(layer.forward.weight), dense)
        chunk = layer(x)  # a prompt chunk: the dequantized weight in torch's matmul, as bitsandbytes computes
        assert torch.equal(chunk, torch.nn.functional.linear(x, dense, layer.bias))
        assert (chunk - before).abs().max() < 1e-4
        with pytest.raises(RuntimeError):
            layer(torch.randn(2, 96))  # the wrong width is bitsandbytes' error, not 192 values read from 2 x 96
    with torch.enable_grad():
        assert torch.equal(layer(x[:4]), before_few)  # gradients (training): bitsandbytes' own layer
    cpu_nf4.uninstall(model)
    with torch.no_grad():
        assert torch.equal(layer(x[:4]), before_few)


def test_an_installed_layer_in_panels_gives_the_kernels_bits_whatever_the_inputs_layout(
        kernel: Nf4Linear, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = bnb_layer("nf4", False)  # 192 inputs in blocks of 64, a bias
    model = torch.nn.Sequential(layer)
    assert cpu_nf4.install(model) == 1
    forward = layer.forward
    assert isinstance(forward, KernelForward) and forward.table is not None  # in panels: called by its table
    wide = torch.randn(2, 8, 200, generator=torch.Generator().manual_seed(7))
    x = wide[..., :192].contiguous()
    with torch.no_grad():
        expected = forward.kernel.forward(x, forward.weight)
        with monkeypatch.context() as patched:  # a dense input goes to the kernel through the table alone
            patched.setattr(forward.kernel, "forward", bitsandbytes_must_not_run)
            patched.setattr(forward, "original", bitsandbytes_must_not_run)
            got = layer(x)
            one = layer(x[1, 3])  # a single token, 1-d
        assert got.shape == (2, 8, 48) and torch.equal(got, expected)  # the bias added, the batch's shape kept
        assert one.shape == (48,) and torch.equal(one, expected[1, 3])
        strided = layer(wide[..., :192])  # not dense: the general entry, the same bits
        assert torch.equal(strided, expected)
    cpu_nf4.uninstall(model)


def test_a_layer_bitsandbytes_would_repack_keeps_its_weight_under_the_kernel(kernel: Nf4Linear) -> None:
    layer = bnb_layer("nf4", nested=True)
    layer.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on a CPU with AVX512-BF16
    packed_bytes = layer.weight.data.clone()
    model = torch.nn.Sequential(layer)
    assert cpu_nf4.install(model) == 1
    assert layer.support_avx512bf16_for_cpu is False
    x = torch.randn(4, 192, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        few = layer(x)
    assert torch.equal(few, kernel.forward(x, layer.forward.weight))
    with torch.enable_grad():
        # handed back to bitsandbytes (gradients on, input without them: the call bitsandbytes repacks on
        # where it may): its portable float32 path, and the weight stays in its own layout
        handed_back = layer(x)
    assert (handed_back - few).abs().max() < 1e-4
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, packed_bytes)
    removed = cpu_nf4.uninstall(model, fused=False)  # tests compare with the portable path
    assert "forward" not in layer.__dict__ and layer.support_avx512bf16_for_cpu is False
    cpu_nf4.reinstall(removed)
    assert layer.forward is removed[0][1] and layer.support_avx512bf16_for_cpu is False
    cpu_nf4.uninstall(model)  # benchmarks: bitsandbytes may repack it for its fused kernel again
    assert "forward" not in layer.__dict__ and layer.support_avx512bf16_for_cpu is True


def test_layers_the_kernel_cannot_read_are_left_alone() -> None:
    plain = torch.nn.Linear(64, 8)
    bfloat16 = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    model = torch.nn.Sequential(plain, bfloat16)
    assert PackedWeight.of(plain) is None and PackedWeight.of(bfloat16) is None
    assert cpu_nf4.install(model) == 0
    assert "forward" not in plain.__dict__ and "forward" not in bfloat16.__dict__
