"""The native LoRA kernel for decode tokens on the CPU (worker/csrc/lora_delta.c) against torch."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from worker import cpu_lora, cpu_lora_probe, native
from worker.cpu_lora import LoraDelta, Scales, TokenTiles, lora_delta_kernel, quantize_rows
from worker.cpu_lora_probe import reference
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


@dataclass
class Stacks:
    """Slot stacks of one of the kernel's dtypes: a [slots + 1, max_rank, members, in], b [slots + 1,
    max_rank, out] (plain: `kernel.blocked(b)` for the kernel), the weights' values in float32 (int8's
    times their rows' scales), and int8's scales."""

    a: torch.Tensor
    b: torch.Tensor
    a_values: torch.Tensor
    b_values: torch.Tensor
    a_scale: torch.Tensor | None = None  # [slots + 1, max_rank, members]
    b_scale: torch.Tensor | None = None  # [slots + 1, max_rank]

    def scales(self, member: int) -> Scales | None:
        if self.a_scale is None or self.b_scale is None:
            return None
        return Scales(self.a_scale[:, :, member], self.b_scale)


def slot_stacks(slots: int, max_rank: int, members: int, in_features: int, out: int, dtype: torch.dtype,
                seed: int = 0) -> Stacks:
    a, b = stacks(slots, max_rank, members, in_features, out, seed)
    if dtype != cpu_lora.INT8:
        a, b = a.to(dtype), b.to(dtype)
        return Stacks(a, b, a.float(), b.float())
    (a_q, a_scale), (b_q, b_scale) = quantize_rows(a.flatten(0, 2)), quantize_rows(b.flatten(0, 1))
    a_scale, b_scale = a_scale.view(a.shape[:3]), b_scale.view(b.shape[:2])
    a_q, b_q = a_q.view(a.shape), b_q.view(b.shape)
    return Stacks(a_q, b_q, a_q.float() * a_scale[..., None], b_q.float() * b_scale[..., None], a_scale, b_scale)


@pytest.mark.parametrize("dtype", cpu_lora.SLOT_DTYPES)
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
    w = slot_stacks(slot_count, 16, members, in_features, out, dtype)
    x = torch.randn(7, in_features) * in_features**-0.5  # shrinks of unit size, as trained adapters give
    slots = torch.tensor([3, slot_count, 0, 3, 1, 2, slot_count])
    h = torch.empty(len(slots), members, rank)
    for member in range(members):
        y = torch.randn(len(slots), out)
        want = reference(x, slots, slot_count, w.a_values, rank, member, w.b_values, y)
        kernel.add(x, kernel.tiles(slots.tolist(), slot_count), w.a, rank, h, member == 0, member,
                   kernel.blocked(w.b), y, scales=w.scales(member))
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
        assert torch.equal(y[1], want[1]) and torch.equal(y[6], want[6])  # skipped tokens: not touched at all


@pytest.mark.parametrize("dtype", cpu_lora.SLOT_DTYPES)
def test_a_tokens_delta_is_the_same_to_the_bit_alone_or_in_any_batch(kernel: LoraDelta, dtype: torch.dtype) -> None:
    """What a row generates must not depend on which other rows share its step: not on how many share
    its adapter (its tile), nor where in the tile it lands, nor on the threads."""
    w = slot_stacks(16, 16, 3, 576, 576, dtype)
    a, b, scales = w.a, kernel.blocked(w.b), w.scales(1)
    token = torch.randn(1, 576)
    y0 = torch.randn(1, 576)
    alone = y0.clone()
    kernel.add(token, kernel.tiles([5], 16), a, 16, torch.empty(1, 3, 16), True, 1, b, alone, scales=scales)
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
                           threads=threads, scales=scales)
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


@pytest.mark.parametrize("dtype", cpu_lora.SLOT_DTYPES)
def test_the_engines_prepared_call_adds_what_add_does(kernel: LoraDelta, dtype: torch.dtype) -> None:
    """`run` (a layer's arguments and a pass's tiles kept in tables) is the engine's way in: every member
    of the stacks, shrinking or reusing the shrinks, must add to the bit what `add` adds."""
    slots = [2, 4, 0, 2, 2, 2, 2, 3]
    tiles = kernel.tiles(slots, 4)
    x = torch.randn(len(slots), 40)
    h_add, h_run = torch.empty(len(slots), 3, 7), torch.empty(len(slots), 3, 7)
    for member in range(3):
        w = slot_stacks(4, 8, 3, 40, 70, dtype, seed=member)  # each member its own B (and A's scales)
        a, b, scales = w.a, kernel.blocked(w.b), w.scales(member)
        y = torch.randn(len(slots), 70)
        before, want = y.clone(), y.clone()
        kernel.add(x, tiles, a, 7, h_add, member == 0, member, b, want, scales=scales)
        layer = kernel.layer(a, b, member, 70, scales)
        kernel.run(layer.address, tiles.address, x.data_ptr(), h_run.data_ptr(), member == 0, y.data_ptr(), 7, 2)
        assert torch.equal(y, want), member
        assert torch.equal(y[1], before[1]) and not torch.equal(y[0], before[0])  # slot 4: no adapter


def test_the_kernel_refuses_stacks_it_cannot_read(kernel: LoraDelta) -> None:
    a, b = stacks(2, 4, 1, 8, 6)
    blocked = kernel.blocked(b)
    assert kernel.layer(a, blocked, 0, 6).values[5] == 6
    for bad_a, bad_b in ((a.half(), blocked.half()), (a, blocked.bfloat16()), (a, blocked[:, :, :2])):
        with pytest.raises(ValueError, match="contiguous float32, bfloat16 or int8"):
            kernel.layer(bad_a, bad_b, 0, 6)
    w = slot_stacks(2, 4, 2, 8, 6, cpu_lora.INT8)
    int8_b = kernel.blocked(w.b)
    scales = w.scales(1)
    assert scales is not None
    for bad_scales in (None, Scales(scales.a[:2], scales.b[:2]), Scales(scales.a.double(), scales.b.double()),
                       Scales(scales.a.contiguous(), scales.b)):  # none, too few, float64, not the members' view
        with pytest.raises(ValueError, match="scales"):
            kernel.layer(w.a, int8_b, 1, 6, bad_scales)
    assert kernel.slot_target(w.a[:, :, 1], int8_b, 6) is None  # int8 rows without their scales: no fills
    assert kernel.slot_target(a[:, :, 0], blocked, 6, scales) is None  # scales for float32 rows
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
        lambda: monkeypatch.setattr(cpu_lora_probe, "probe_error", lambda kernel: 0.5),
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


def int8_layers(kernel: LoraDelta) -> list[MultiLoraLinear]:
    """`two_layers` on int8 stacks, both with the kernel (int8 stacks are its alone): the first fills
    through it, the second is handed float64 files, which the kernel does not read, so torch fills it."""
    from worker.lora import SharedInput

    return [MultiLoraLinear(nn.Linear(24, 40), 24, 40, 3, 8, LoraRouting(kernel=kernel), CPU, cpu_lora.INT8,
                            (SharedInput(2, 3, 8, 24, CPU, cpu_lora.INT8), 1)) for _ in range(2)]


def test_int8_slot_fills_hold_each_rows_int8_multiples_of_its_scale_through_the_kernel_or_torch(
        kernel: LoraDelta) -> None:
    """int8 slots: each rank's row of A, and of B transposed and scaled, is its largest magnitude / 127
    times int8 values rounded to nearest; the kernel's fill and torch's write the same bits, and a
    narrower adapter after a wider one leaves nothing behind."""
    native, torch_path = int8_layers(kernel)
    generator = torch.Generator().manual_seed(4)
    for slot, rank, scale in ((1, 8, 0.37), (1, 3, 2.0 / 3.0), (0, 5, 16.0), (2, 1, 1e-3)):
        a = torch.randn(rank, 24, generator=generator) * 3
        b = torch.randn(40, rank, generator=generator) * 1e-2
        assert not native.load_slot(slot, a, b, scale).any()  # the kernel's answer: all finite
        assert torch_path.load_slot(slot, a.double(), b.double(), scale).isfinite().all()  # torch's: the sums
        for layer in (native, torch_path):
            assert layer.scales is not None
            a_scale, b_scale = layer.scales.a[slot, :rank], layer.scales.b[slot, :rank]
            torch.testing.assert_close(a_scale, a.abs().amax(dim=1) / 127)
            torch.testing.assert_close(b_scale, (b.T * scale).abs().amax(dim=1) / 127)
            a_values = layer.lora_a[slot, :rank].float() * a_scale[:, None]
            b_values = layer.b_rows(slot, slot + 1, rank)[0]
            assert (a_values - a).abs().le(a_scale[:, None] / 2 * 1.0001).all()  # within half a step
            assert (b_values - b.T * scale).abs().le(b_scale[:, None] / 2 * 1.0001).all()
            assert not layer.lora_a[slot, rank:].any() and not layer.b_rows(slot, slot + 1, 8)[0, rank:].any()
        assert torch.equal(native.lora_a, torch_path.lora_a) and torch.equal(native.lora_b, torch_path.lora_b)
        assert native.scales is not None and torch_path.scales is not None
        assert torch.equal(native.scales.a, torch_path.scales.a) and torch.equal(native.scales.b, torch_path.scales.b)
    assert native.shared.a_scale is not None
    assert not native.shared.a[:, :, 0].any() and not native.shared.a_scale[:, :, 0].any()  # the other layer's


def test_int8_slot_fills_measure_what_the_rounding_loses_through_the_kernel_or_torch(kernel: LoraDelta) -> None:
    """Each int8 fill keeps, per slot, the larger of A's and scaled B's relative root-mean-square rounding
    error: the kernel's sums and torch's agree, a row whose small weights all round to zero loses them,
    all-zero weights lose nothing, and clearing the slot forgets it."""
    native, torch_path = int8_layers(kernel)
    generator = torch.Generator().manual_seed(6)
    a, b = torch.randn(8, 24, generator=generator), torch.randn(40, 8, generator=generator)
    spiky = torch.full((8, 24), 0.003)  # under half a step of each row's largest weight, 1.0: they round to 0
    spiky[:, 5] = 1.0
    lost = (23 * 0.003**2 / (1 + 23 * 0.003**2)) ** 0.5  # 1.44%, more than B's Gaussian rows lose
    for slot, (weights_a, weights_b, scale) in enumerate(((a, b, 0.5), (spiky, b * 1e-3, 2.0), (a * 0, b * 0, 1.0))):
        expected = cpu_lora.rounding_error(weights_a.float(), (weights_b.T * scale).float())
        native.load_slot(slot, weights_a, weights_b, scale)
        torch_path.load_slot(slot, weights_a.double(), weights_b.double(), scale)
        assert native.rounding[slot] == pytest.approx(expected, rel=1e-4, abs=1e-9)
        assert torch_path.rounding[slot] == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert 0.001 < native.rounding[0] < 0.01  # Gaussian rows: well under 1%
    assert native.rounding[1] == pytest.approx(lost, rel=1e-4)
    assert native.rounding[2] == 0.0  # nothing to lose
    native.clear_slot(1)
    assert native.rounding[1] == 0.0


@pytest.mark.parametrize("row", ["huge", "subnormal"])
def test_int8_rounding_stays_finite_and_agrees_at_float32s_edges(kernel: LoraDelta, row: str) -> None:
    """A weight at float32's largest (its square overflows float32) or rows of subnormals: the kernel's
    measure (summed in steps of the row's scale) is finite and agrees with torch's (in float64)."""
    native, torch_path = int8_layers(kernel)
    a, b = torch.full((4, 24), 0.5), torch.full((40, 4), 0.5)
    if row == "huge":
        a[2, 7] = 3.4e38
    else:
        a = torch.full((4, 24), 1e-40)
        a[:, 0] = 1e-38
    for layer, file_dtype in ((native, torch.float32), (torch_path, torch.float64)):
        layer.load_slot(1, a.to(file_dtype), b.to(file_dtype), 1.0)
        assert layer.slot_is_finite(1)
    assert native.rounding[1] == pytest.approx(torch_path.rounding[1], rel=1e-3, abs=1e-6)
    assert 0.0 <= native.rounding[1] < 0.02


@pytest.mark.parametrize(("a_value", "b_value", "scale", "finite"), [
    (float("nan"), 0.1, 1.0, False), (0.1, float("inf"), 1.0, False), (0.1, -float("inf"), 1.0, False),
    (0.1, 3e38, 10.0, False),  # the scale overflows float32
    (3.4e38, 0.1, 1.0, True),  # float32's range: its row's scale is 3.4e38 / 127
    (0.0, 0.1, 1.0, True),  # a zero row: scale 0, adds nothing
])  # fmt: skip
def test_int8_slot_fills_report_weights_that_are_not_finite(kernel: LoraDelta, a_value: float, b_value: float,
                                                            scale: float, finite: bool) -> None:
    native, torch_path = int8_layers(kernel)
    a, b = torch.full((4, 24), 0.5), torch.full((40, 4), 0.5)
    a[2, 7], b[13, 1] = a_value, b_value
    if a_value == 0.0:
        a[2] = 0.0
    for layer, file_dtype in ((native, torch.float32), (torch_path, torch.float64)):
        answer = layer.load_slot(1, a.to(file_dtype), b.to(file_dtype), scale)
        assert layer.slot_is_finite(1) == finite
        assert bool(answer.isfinite().all()) == finite
    assert torch.equal(native.lora_a, torch_path.lora_a)


def test_int8_layers_add_the_deltas_of_their_dequantized_weights_on_decode_rows_and_prompt_chunks(
        kernel: LoraDelta) -> None:
    """A layer on int8 slots adds, for decode tokens (the kernel) and prompt chunks (torch's matmuls, on
    float32 copies), the delta of its weights' values: within rounding of the float32 adapter's."""
    routing = LoraRouting(kernel=kernel)
    base = nn.Linear(24, 40)
    int8_layer = MultiLoraLinear(base, 24, 40, 3, 8, routing, CPU, cpu_lora.INT8)
    exact = MultiLoraLinear(base, 24, 40, 3, 8, routing, CPU, torch.float32)
    generator = torch.Generator().manual_seed(5)
    for slot in range(3):
        a, b = torch.randn(8, 24, generator=generator), torch.randn(40, 8, generator=generator)
        for layer in (int8_layer, exact):
            layer.load_slot(slot, a, b, 0.5)
    chunk = BIG_SLOT_TOKENS + 2
    x = torch.randn(chunk + 3, 24, generator=generator)
    for slots, counts in (([0, 1, 2, 3], [1, 1, 1, 1]), ([1, 2, 0], [chunk, 1, 2])):
        tokens = sum(counts)
        routing.route(slots, 3, lambda slot: 8, CPU, counts)
        with torch.no_grad():
            got, want, plain = int8_layer(x[:tokens]), exact(x[:tokens]), base(x[:tokens])
        assert not torch.equal(got, plain)
        torch.testing.assert_close(got, want, rtol=0.03, atol=0.03 * float(want.abs().max()))
        if slots[-1] == 3:  # the base row: untouched
            assert torch.equal(got[3], plain[3])
