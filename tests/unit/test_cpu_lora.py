"""The native LoRA kernel for decode tokens on the CPU (worker/csrc/lora_delta.c) against torch."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from torch import nn

from worker import cpu_lora, native
from worker.cpu_lora import LoraDelta, TokenTiles, lora_delta_kernel, reference
from worker.lora import MultiLoraLinear
from worker.lora_routing import BIG_SLOT_TOKENS, LoraRouting

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler to build the kernel")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernel() -> LoraDelta:
    built = lora_delta_kernel()
    assert built is not None
    return built


def stacks(slots: int, max_rank: int, members: int, in_features: int, out: int, seed: int = 0,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(slots + 1, max_rank, members, in_features, generator=generator)
    b = torch.randn(slots + 1, max_rank, out, generator=generator)
    a[slots].zero_()
    b[slots].zero_()
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", cpu_lora.WEIGHT_DTYPES)
@pytest.mark.parametrize(("in_features", "out", "rank", "members"), [
    (576, 192, 16, 3),  # the embedded model's k_proj among q/k/v, rank a multiple of the blocks
    (1536, 576, 8, 1),  # down_proj on its own
    (37, 130, 5, 2),  # widths and a rank that fill no block or chunk exactly
    (3, 1, 1, 1),  # smaller than one lane
])
def test_every_routed_token_gets_its_own_slots_delta(kernel: LoraDelta, in_features: int, out: int, rank: int,
                                                     members: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    slot_count = 4
    a, b = stacks(slot_count, 16, members, in_features, out, dtype=dtype)
    x = torch.randn(7, in_features) * in_features**-0.5  # shrinks of unit size, as trained adapters give
    slots = torch.tensor([3, slot_count, 0, 3, 1, 2, slot_count])
    h = torch.empty(len(slots), members, rank)
    for member in range(members):
        y = torch.randn(len(slots), out)
        want = reference(x, slots, slot_count, a, rank, member, b, y)
        kernel.add(x, kernel.tiles(slots.tolist(), slot_count), a, rank, h, member == 0, member, kernel.blocked(b), y)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
        assert torch.equal(y[1], want[1]) and torch.equal(y[6], want[6])  # skipped tokens: not touched at all


@pytest.mark.parametrize("dtype", cpu_lora.WEIGHT_DTYPES)
def test_a_tokens_delta_is_the_same_to_the_bit_alone_or_in_any_batch(kernel: LoraDelta, dtype: torch.dtype) -> None:
    """What a row generates must not depend on which other rows share its step: not on how many share
    its adapter (its tile), nor where in the tile it lands, nor on the threads."""
    a, b = stacks(16, 16, 3, 576, 576, dtype=dtype)
    token = torch.randn(1, 576)
    y0 = torch.randn(1, 576)
    alone = y0.clone()
    b = kernel.blocked(b)
    kernel.add(token, kernel.tiles([5], 16), a, 16, torch.empty(1, 3, 16), True, 1, b, alone)
    generator = torch.Generator().manual_seed(1)
    for others_on_slot in (0, 1, kernel.tile - 1, kernel.tile, 2 * kernel.tile + 1):
        for position in range(min(others_on_slot, kernel.tile) + 1):
            slots = [5] * others_on_slot + [0, 1, 16, 9, 11, 3]
            slots.insert(position, 5)  # the token's place among its slot's tokens
            batch, y = torch.randn(len(slots), 576, generator=generator), torch.randn(len(slots), 576)
            batch[position], y[position] = token[0], y0[0]
            for threads in (1, 2):
                out = y.clone()
                kernel.add(batch, kernel.tiles(slots, 16), a, 16, torch.empty(len(slots), 3, 16), True, 1, b, out,
                           threads=threads)
                assert torch.equal(out[position], alone[0]), (others_on_slot, position, threads)


@pytest.mark.parametrize(("in_features", "out", "rank"), [(576, 1536, 16), (37, 130, 5)])
def test_bfloat16_stacks_give_to_the_bit_what_float32_stacks_of_the_same_values_give(
    kernel: LoraDelta, in_features: int, out: int, rank: int
) -> None:
    """bfloat16 slots only halve the bytes read: the weights are widened exactly and every sum is the
    float32 kernel's, so nothing but the rounding of the weights themselves separates the two."""
    a, b = stacks(4, 16, 2, in_features, out, dtype=torch.bfloat16)
    slots = [1, 4, 1, 3, 0, 1, 1, 1, 2]
    x = torch.randn(len(slots), in_features)
    results = []
    for a_, b_ in ((a, b), (a.float(), b.float())):
        y = torch.ones(len(slots), out)
        h = torch.empty(len(slots), 2, rank)
        kernel.add(x, kernel.tiles(slots, 4), a_, rank, h, True, 1, kernel.blocked(b_), y)
        results.append(y)
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0][0], torch.ones(out))


@pytest.mark.parametrize("dtype", cpu_lora.WEIGHT_DTYPES)
def test_the_engines_prepared_call_adds_what_add_does(kernel: LoraDelta, dtype: torch.dtype) -> None:
    """`run` (a layer's arguments and a pass's tiles kept in tables) is the engine's way in: every member
    of the stacks, shrinking or reusing the shrinks, must add to the bit what `add` adds."""
    a, b_stacks = stacks(4, 8, 3, 40, 70, dtype=dtype)
    slots = [2, 4, 0, 2, 2, 2, 2, 3]
    tiles = kernel.tiles(slots, 4)
    x = torch.randn(len(slots), 40)
    h_add, h_run = torch.empty(len(slots), 3, 7), torch.empty(len(slots), 3, 7)
    for member in range(3):
        b = kernel.blocked(b_stacks * (member + 1))
        y = torch.randn(len(slots), 70)
        before, want = y.clone(), y.clone()
        kernel.add(x, tiles, a, 7, h_add, member == 0, member, b, want)
        layer = kernel.layer(a, b, member, 70)
        kernel.run(layer.address, tiles.address, x.data_ptr(), h_run.data_ptr(), member == 0, y.data_ptr(), 7, 2)
        assert torch.equal(y, want), member
        assert torch.equal(y[1], before[1]) and not torch.equal(y[0], before[0])  # slot 4: no adapter


def test_the_kernel_refuses_stacks_it_cannot_read(kernel: LoraDelta) -> None:
    a, b = stacks(2, 4, 1, 8, 6)
    blocked = kernel.blocked(b)
    assert kernel.layer(a, blocked, 0, 6).values[5] == 6
    for bad_a, bad_b in ((a.half(), blocked.half()), (a, blocked.bfloat16()), (a, blocked[:, :, :2])):
        with pytest.raises(ValueError, match="contiguous float32 or bfloat16"):
            kernel.layer(bad_a, bad_b, 0, 6)
    for bad_b, out in ((b, 6), (blocked, kernel.chunk + 6)):  # not in column blocks, or not of `out` columns
        with pytest.raises(ValueError, match="column"):
            kernel.layer(a, bad_b, 0, out)


def test_column_blocks_hold_every_column_once_and_zeros_past_the_last(kernel: LoraDelta) -> None:
    b = torch.randn(3, 5, 2 * kernel.chunk + 7)
    blocked = kernel.blocked(b)
    assert blocked.shape == (3, 3, 5, kernel.chunk) and blocked.is_contiguous()
    assert torch.equal(blocked[1, 2, 4, :7], b[1, 4, 2 * kernel.chunk:]) and not blocked[:, 2, :, 7:].any()
    assert torch.equal(kernel.unblocked(blocked, b.shape[-1]), b)


def tile_groups(tiles: TokenTiles) -> list[tuple[int, list[int]]]:
    """(slot, tokens) of each tile, read back from the table the kernel reads."""
    table = tiles.table.tolist()
    routed = len(table) - 2 * tiles.count - 1
    order, starts, tile_slots = table[:routed], table[routed:routed + tiles.count + 1], table[routed + tiles.count + 1:]
    return [(tile_slots[g], order[starts[g]:starts[g + 1]]) for g in range(tiles.count)]


def kernel_slots(routing: LoraRouting, tokens: int, none: int) -> list[int]:
    """Each token's slot as the kernel takes it; `none` for the tokens it leaves to torch."""
    assert routing.kernel_tiles is not None
    slots = [none] * tokens
    for slot, routed in tile_groups(routing.kernel_tiles):
        for token in routed:
            slots[token] = slot
    return slots


def test_tiles_group_a_slots_tokens_in_order_and_leave_out_the_skipped(kernel: LoraDelta) -> None:
    tile = kernel.tile
    slots = [2, 7, 2, 9] + [2] * tile + [7]
    twos = [0, 2, *range(4, 4 + tile)]
    want = [(2, twos[i:i + tile]) for i in range(0, len(twos), tile)] + [(7, [1, 4 + tile])]
    assert tile_groups(kernel.tiles(slots, 9)) == want
    assert kernel.tiles([9, 9], 9).count == 0


def test_strided_rows_of_input_and_output_are_read_and_written_where_they_are(kernel: LoraDelta) -> None:
    a, b = stacks(2, 4, 1, 8, 6)
    wide_x, wide_y = torch.randn(3, 20), torch.randn(3, 9)
    x, y = wide_x[:, 2:10], wide_y[:, 1:7]  # rows 20 and 9 floats apart
    before = wide_y.clone()
    slots = torch.tensor([1, 0, 2])
    want = reference(x, slots, 2, a, 4, 0, b, y)
    kernel.add(x, kernel.tiles(slots.tolist(), 2), a, 4, torch.empty(3, 1, 4), True, 0, kernel.blocked(b), y)
    torch.testing.assert_close(y, want)
    assert torch.equal(wide_y[:, 0], before[:, 0]) and torch.equal(wide_y[:, 7:], before[:, 7:])


def test_decode_tokens_go_to_the_kernel_and_prompt_chunks_to_torchs_matmuls(kernel: LoraDelta) -> None:
    routing = LoraRouting(kernel=kernel)
    chunk = BIG_SLOT_TOKENS + 4
    routing.route([0, 1, 2, 1], 3, lambda slot: 8, CPU, [1, chunk, 1, 1])  # slot 1: a chunk and a decode row
    assert kernel_slots(routing, chunk + 3, 3) == [0] + [3] * chunk + [2, 3]
    assert routing.single == 1 and routing.single_rows is not None and len(routing.single_rows) == chunk + 1
    routing.route([0, 1, 3], 3, lambda slot: 8, CPU)  # decode rows only: nothing left for torch
    assert kernel_slots(routing, 3, 3) == [0, 1, 3]
    assert routing.single is None and routing.groups is None and not routing.big
    routing.route([3, 3], 3, lambda slot: 8, CPU)  # base rows only
    assert routing.slots is None and routing.kernel_tiles is None
    LoraRouting(kernel=None).route([0, 1], 3, lambda slot: 8, CPU)


def test_a_base_layer_that_returns_another_dtype_gets_its_delta_in_that_dtype(kernel: LoraDelta) -> None:
    class HalfBase(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x).to(torch.bfloat16)

    outputs = []
    for with_kernel in (kernel, None):
        torch.manual_seed(0)
        routing = LoraRouting(kernel=with_kernel)
        layer = MultiLoraLinear(HalfBase(), 16, 8, 2, 4, routing, CPU, torch.float32)
        layer.load_slot(0, torch.randn(4, 16), torch.randn(8, 4), 2.0)
        routing.route([0, 2, 0], 2, lambda slot: 4, CPU)
        outputs.append(layer(torch.randn(3, 1, 16)))
    assert outputs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[0], outputs[1])


def test_without_a_working_compiler_or_with_a_wrong_kernel_the_engine_keeps_torchs_matmuls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def hung(*args: object, **kwargs: object) -> None:
        raise subprocess.TimeoutExpired("cc", 120)

    breakages = [
        lambda: monkeypatch.setattr(native.shutil, "which", lambda name: None),
        lambda: monkeypatch.setattr(cpu_lora, "probe_error", lambda kernel: 0.5),
        lambda: monkeypatch.setattr(native.subprocess, "run", hung),
        lambda: monkeypatch.setattr(cpu_lora, "SOURCE", cpu_lora.SOURCE.with_name("missing.c")),
    ]
    try:
        for breakage in breakages:
            lora_delta_kernel.cache_clear()
            breakage()
            assert lora_delta_kernel() is None
            monkeypatch.undo()
    finally:
        monkeypatch.undo()
        lora_delta_kernel.cache_clear()
    assert lora_delta_kernel() is not None


def slot_bits(t: torch.Tensor) -> torch.Tensor:
    """A slot's weights as integers, so that equal means equal to the bit (NaNs as one)."""
    t = torch.where(t.isnan(), torch.nan, t)  # torch writes one of several NaNs; any is refused alike
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def two_layers(kernel: LoraDelta, slot_dtype: torch.dtype) -> list[MultiLoraLinear]:
    """A q_proj-like layer sharing its input with another (A interleaved), with and without the kernel."""
    from worker.lora import SharedInput

    layers = []
    for with_kernel in (kernel, None):
        shared = SharedInput(2, 3, 8, 24, CPU, slot_dtype)
        layers.append(MultiLoraLinear(nn.Linear(24, 40), 24, 40, 3, 8, LoraRouting(kernel=with_kernel), CPU,
                                      slot_dtype, (shared, 1)))
    return layers


@pytest.mark.parametrize("slot_dtype", cpu_lora.WEIGHT_DTYPES)
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_slot_fills_write_what_torchs_copies_write_to_the_bit(kernel: LoraDelta, slot_dtype: torch.dtype,
                                                              file_dtype: torch.dtype) -> None:
    """An adapter's weights go into a slot through the kernel (one call a layer) where it reads the file's
    dtype, else through torch; either way the slot holds the same bits: A as rounded once, B times the
    scale in float32 and then rounded once, a narrower adapter after a wider one leaves nothing behind."""
    native, torch_path = two_layers(kernel, slot_dtype)
    generator = torch.Generator().manual_seed(3)
    for slot, rank, scale in ((1, 8, 0.37), (1, 3, 2.0 / 3.0), (0, 5, 16.0), (2, 1, 1e-3)):
        a = (torch.randn(rank, 24, generator=generator) * 3).to(file_dtype)
        b = (torch.randn(40, rank, generator=generator) * 1e-2).to(file_dtype)
        answers = [layer.load_slot(slot, a, b, scale) for layer in (native, torch_path)]
        assert all(bool(answer.isfinite().all()) for answer in answers)
        assert torch.equal(slot_bits(native.lora_a), slot_bits(torch_path.lora_a))
        # the kernel's layer keeps B in column blocks (zeros past the layer's columns), the other plainly
        assert torch.equal(slot_bits(native.lora_b), slot_bits(kernel.blocked(torch_path.lora_b)))
    assert not native.shared.a[:, :, 0].any()  # the other layer's interleaved rows: untouched
    # the kernel took the file's dtypes it reads (its answer is exact: zeros, not the sums torch's path checks)
    took = native.load_slot(0, a, b, scale).abs().sum() == 0
    assert bool(took) == (file_dtype in cpu_lora.FILE_DTYPES)


@pytest.mark.parametrize("slot_dtype", cpu_lora.WEIGHT_DTYPES)
@pytest.mark.parametrize(("a_value", "b_value", "scale"), [
    (float("nan"), 0.1, 1.0), (0.1, float("inf"), 1.0), (0.1, -float("inf"), 1.0),
    (0.1, 3e38, 10.0),  # the scale overflows float32 (and bfloat16)
    (3.4e38, 0.1, 1.0),  # rounds up past bfloat16's largest value; finite in float32
])  # fmt: skip
def test_slot_fills_report_weights_that_are_not_finite_in_the_slot(
    kernel: LoraDelta, slot_dtype: torch.dtype, a_value: float, b_value: float, scale: float
) -> None:
    native, torch_path = two_layers(kernel, slot_dtype)
    a, b = torch.full((4, 24), 0.5), torch.full((40, 4), 0.5)
    a[2, 7], b[13, 1] = a_value, b_value
    for layer in (native, torch_path):
        answer = layer.load_slot(1, a, b, scale)
        finite_in_slot = layer.slot_is_finite(1)
        assert finite_in_slot == (slot_dtype == torch.float32 and a_value == 3.4e38)
        if not finite_in_slot:
            assert not answer.isfinite().all()


def test_slot_fills_refuse_nothing_they_cannot_read_but_leave_it_to_torch(kernel: LoraDelta) -> None:
    native, torch_path = two_layers(kernel, torch.float32)
    a, b = torch.randn(4, 48)[:, ::2], torch.randn(4, 40).T  # strided file tensors: torch copies them
    target = kernel.slot_target(native.lora_a, native.lora_b, 40)
    assert target is not None
    assert kernel.slot_target(native.lora_a, torch_path.lora_b, 40) is None  # not in column blocks
    assert kernel.fill(target, 1, a, b, 0.5) is None
    assert kernel.fill(target, 1, torch.randn(9, 24), torch.randn(40, 9), 0.5) is None  # over max_rank
    assert kernel.fill(target, 1, torch.randn(4, 23), torch.randn(40, 4), 0.5) is None  # the wrong width
    with pytest.raises(IndexError):  # past the stacks: refused, not written
        kernel.fill(target, 4, torch.randn(4, 24), torch.randn(40, 4), 0.5)
    assert kernel.slot_target(native.lora_a.to(torch.float16), native.lora_b.to(torch.float16), 40) is None
    for layer in (native, torch_path):
        layer.load_slot(1, a, b, 0.5)
    assert torch.equal(native.lora_a, torch_path.lora_a)
    assert torch.equal(native.lora_b, kernel.blocked(torch_path.lora_b))
