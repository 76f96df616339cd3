"""The engine's multi-adapter LoRA layer against PEFT's formula, row by row (torch, no model).

Every test runs on torch's matmuls and with the native kernel for decode tokens on the CPU
(`worker.cpu_lora`) where a C compiler is there to build it, each with float32 and with bfloat16
slots (`make_layer`; against the weights as the slots hold them).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from app.settings import Settings
from worker import runtime
from worker.config import WorkerConfig
from worker.cpu_lora import LoraDelta, lora_delta_kernel
from worker.lora import MultiLoraLinear
from worker.lora_model import install_lora_layers, slots_in_budget
from worker.lora_routing import LoraRouting
from worker.runtime import lora_slot_dtype

IN, OUT, SLOTS, MAX_RANK = 12, 10, 3, 8
KERNEL: LoraDelta | None = None  # the path under test: set per test by `lora_path`
SLOT_DTYPE = torch.float32  # `make_layer`'s slots: set per test by `slot_dtype`


@pytest.fixture(autouse=True, params=["torch", "native kernel"])
def lora_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param == "native kernel":
        kernel = lora_delta_kernel()
        if kernel is None:
            assert shutil.which("cc") is None and shutil.which("gcc") is None, "the native LoRA kernel was rejected"
            pytest.skip("no C compiler: the native LoRA kernel cannot be built here")
        monkeypatch.setitem(globals(), "KERNEL", kernel)


@pytest.fixture(autouse=True, params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def slot_dtype(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(globals(), "SLOT_DTYPE", request.param)


def stored(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A and scaled B as float32 after the trip through `make_layer`'s slots (B scaled, then rounded once)."""
    return a.to(SLOT_DTYPE).float(), (b.float() * scale).to(SLOT_DTYPE).float()


def new_routing(native: bool = True) -> LoraRouting:
    return LoraRouting(kernel=KERNEL if native else None)


Weights = dict[int, tuple[torch.Tensor, torch.Tensor]]


def make_layer(native: bool = True) -> tuple[MultiLoraLinear, LoraRouting, Weights]:
    torch.manual_seed(0)
    routing = new_routing(native)
    layer = MultiLoraLinear(nn.Linear(IN, OUT), IN, OUT, SLOTS, MAX_RANK, routing, torch.device("cpu"), SLOT_DTYPE)
    weights = {}
    # Ranks differ (narrower ones are zero-padded), so do scales and stored dtypes.
    cases = ((0, 4, 1.0, torch.float32), (1, 8, 0.5, torch.bfloat16), (2, 2, 4.0, torch.float16))
    for slot, rank, scale, dtype in cases:
        a, b = torch.randn(rank, IN).to(dtype), (torch.randn(OUT, rank) * 0.5).to(dtype)
        layer.load_slot(slot, a, b, scale)
        weights[slot] = stored(a, b, scale)
    return layer, routing, weights


def route(routing: LoraRouting, slots: list[int | None], ranks: dict[int, int], tokens: int | list[int] = 1) -> None:
    """Route rows of `tokens` tokens each (or ragged rows of `tokens[i]`), read row-major."""
    ids = [SLOTS if s is None else s for s in slots]  # the last slot is the always-zero one
    lengths = tokens if isinstance(tokens, list) else [tokens] * len(slots)
    routing.route(ids, SLOTS, lambda slot: ranks[slot], torch.device("cpu"), lengths)


def expected(layer: MultiLoraLinear, x: torch.Tensor, slots: list[int | None], weights: dict) -> torch.Tensor:  # type: ignore[type-arg]
    rows = []
    for row, slot in zip(x, slots, strict=True):
        y = layer.base(row)
        if slot is not None:
            a, b = weights[slot]
            y = y + row @ a.T @ b.T
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize(
    "slots",
    [
        [1, None, 0, 2, 1],  # several adapters and base rows in one batch
        [0, 1, 2],  # every row its own adapter
        [2, 0, 1, 1, 0, 2],  # every slot in the span equally busy, rows out of slot order: no zero row
        [2, None, 0, 2, 2],  # a busy slot, a gap in the span of slots in use
        [2, 2, 2],  # one adapter on every row
        [None, 0, None],  # one adapter beside base rows
        [1],
    ],
)
@pytest.mark.parametrize("tokens", [1, 3])  # decode, prefill
def test_each_row_gets_its_own_adapter(slots: list[int | None], tokens: int) -> None:
    layer, routing, weights = make_layer()
    ranks = {s: w[0].shape[0] for s, w in weights.items()}
    route(routing, slots, ranks, tokens)
    x = torch.randn(len(slots), tokens, IN)  # [batch, tokens, in]
    torch.testing.assert_close(layer(x), expected(layer, x, slots, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("slots", "lengths"),
    [
        ([1, 0, 2, 0, None], [1, 1, 40, 1, 1]),  # decode rows around a prompt chunk on its own adapter
        ([0, 1, None, 0], [30, 20, 5, 1]),  # two chunks on two adapters, a base chunk, a decode row
        ([2, 2, 0], [1, 25, 1]),  # a slot with a decode row and a chunk
        ([0, None], [50, 3]),  # one adapter beside base tokens
    ],
)
def test_a_flat_pass_of_ragged_rows_gives_each_token_its_rows_adapter(
    slots: list[int | None], lengths: list[int]
) -> None:
    """The engine's layout: one pass of decode rows and prompt chunks of any length, one after another."""
    layer, routing, weights = make_layer()
    route(routing, slots, {s: w[0].shape[0] for s, w in weights.items()}, lengths)
    x = torch.randn(1, sum(lengths), IN)  # [1, tokens, in]
    per_token = [slot for slot, n in zip(slots, lengths, strict=True) for _ in range(n)]
    want = expected(layer, x[0].unsqueeze(1), per_token, weights).view(1, -1, OUT)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_a_decode_pass_runs_its_lora_on_one_thread_and_gives_every_thread_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """One adapter's tiny decode matmuls run on one thread; the base layers, prompt chunks and passes of
    several adapters keep them all, even when the adapter math fails: a thread count left at 1 would
    halve the whole engine on 2 cores."""
    layer, routing, weights = make_layer(native=False)  # the native kernel takes its threads itself
    ranks = {s: w[0].shape[0] for s, w in weights.items()}
    threads_seen: list[int] = []
    real = layer._add_lora

    def counting(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        threads_seen.append(torch.get_num_threads())
        return real(x, y)

    def failing(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("adapter math failed")

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(layer, "_add_lora", counting)
        route(routing, [0, None, 0], ranks)
        x = torch.randn(3, 1, IN)
        torch.testing.assert_close(layer(x), expected(layer, x, [0, None, 0], weights), rtol=1e-5, atol=1e-5)
        route(routing, [0, 0], ranks, [1, 40])  # a prompt chunk: big enough to split
        layer(torch.randn(1, 41, IN))
        route(routing, [0, 1], ranks)  # two adapters: the grouped path keeps every thread
        layer(torch.randn(2, 1, IN))
        assert threads_seen == [1, 2, 2] and torch.get_num_threads() == 2
        monkeypatch.setattr(layer, "_add_lora", failing)
        route(routing, [0], ranks)
        with pytest.raises(RuntimeError, match="adapter math failed"):
            layer(torch.randn(1, 1, IN))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_no_adapter_rows_leave_the_base_output_alone() -> None:
    layer, routing, _ = make_layer()
    routing.clear()
    x = torch.randn(2, 3, IN)
    torch.testing.assert_close(layer(x), layer.base(x))


def test_cleared_slot_adds_nothing() -> None:
    layer, routing, weights = make_layer()
    layer.clear_slot(1)
    route(routing, [1, 0], {0: 4, 1: 8, 2: 2})
    x = torch.randn(2, 1, IN)
    weights.pop(1)
    torch.testing.assert_close(layer(x), expected(layer, x, [None, 0], weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("poison", [float("inf"), float("nan"), 3e38])
@pytest.mark.parametrize("slots", [[0, None, None, 0], [0, None, 1, None]])
def test_base_rows_keep_exact_base_values_whatever_an_adapter_in_the_batch_holds(
    poison: float, slots: list[int | None]
) -> None:
    """One adapter beside base rows used to be masked by x 0, and inf x 0 = NaN reached the base rows."""
    layer, routing, weights = make_layer()
    a, b = weights[0]
    layer.load_slot(0, torch.full_like(a, poison), torch.full_like(b, poison), 1.0)
    route(routing, slots, {s: w[0].shape[0] for s, w in weights.items()}, 3)
    x = torch.randn(len(slots), 3, IN)
    out = layer(x)
    for row, slot in enumerate(slots):
        if slot is None:
            assert torch.equal(out[row], layer.base(x[row : row + 1])[0])  # bit for bit


@pytest.mark.parametrize("poison", [float("inf"), float("nan"), 3e38])
def test_an_adapter_no_row_uses_adds_nothing_to_rows_on_slots_around_it(poison: float) -> None:
    """Rows on slots 0 and 2 are multiplied slot by slot over the span 0..2; slot 1 (no row on it)
    may hold anything and must not reach them."""
    layer, routing, weights = make_layer()
    layer.lora_a[1, :8] = poison  # past load_slot's check, as a bug or a race would leave it
    layer.lora_b[1, :8] = poison
    route(routing, [2, 0, None], {s: w[0].shape[0] for s, w in weights.items()})
    x = torch.randn(3, 1, IN) * 100
    out = layer(x)
    weights.pop(1)
    torch.testing.assert_close(out, expected(layer, x, [2, 0, None], weights), rtol=1e-5, atol=1e-4)


def test_load_slot_reports_values_that_overflow_the_slot_dtype() -> None:
    layer, _, _ = make_layer()
    big = torch.full((2, IN), 1e300, dtype=torch.float64)  # finite in float64, inf in the float32 slot
    assert not layer.load_slot(0, big, torch.ones(OUT, 2), 1.0).isfinite().all()
    assert not layer.slot_is_finite(0)
    assert not layer.load_slot(0, torch.ones(2, IN), torch.full((OUT, 2), 3e38), 10.0).isfinite().all()
    assert not layer.slot_is_finite(0)  # the scale overflows
    assert layer.load_slot(0, torch.ones(2, IN), torch.ones(OUT, 2), 2.0).isfinite().all()
    assert layer.slot_is_finite(0)


def test_a_narrower_adapter_reloaded_into_a_slot_leaves_nothing_of_the_wider_one() -> None:
    layer, routing, weights = make_layer()  # slot 1 holds a rank-8 adapter
    a, b = torch.randn(2, IN), torch.randn(OUT, 2)
    layer.load_slot(1, a, b, 3.0)  # rank 2 into the same slot, read at rank 4 beside slot 0's adapter
    weights[1] = stored(a, b, 3.0)
    x = torch.randn(3, IN)
    route(routing, [1, 0, 1], {0: 4, 1: 2, 2: 2})
    torch.testing.assert_close(layer(x), expected(layer, x, [1, 0, 1], weights), rtol=1e-5, atol=1e-4)
    layer.clear_slot(1)
    layer.load_slot(1, torch.randn(8, IN), torch.randn(OUT, 8), 1.0)  # wider again after a clear
    layer.load_slot(1, a, b, 3.0)
    torch.testing.assert_close(layer(x), expected(layer, x, [1, 0, 1], weights), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("slots", [[1, 1], [1, None], [0, 1, 2, 1], [1] * 20 + [0]])
def test_an_adapter_replaced_in_a_slot_at_the_same_rank_is_what_the_next_pass_computes(
    slots: list[int | None],
) -> None:
    """Passes reuse views of the slot stacks: a new adapter written into a slot must show through them."""
    layer, routing, weights = make_layer()
    x = torch.randn(len(slots), IN)
    route(routing, slots, {0: 4, 1: 8, 2: 2})
    torch.testing.assert_close(layer(x), expected(layer, x, slots, weights), rtol=1e-5, atol=1e-4)
    a, b = torch.randn(8, IN), torch.randn(OUT, 8)
    layer.load_slot(1, a, b, 2.0)  # slot 1 again at rank 8, another adapter
    weights[1] = stored(a, b, 2.0)
    route(routing, slots, {0: 4, 1: 8, 2: 2})
    torch.testing.assert_close(layer(x), expected(layer, x, slots, weights), rtol=1e-5, atol=1e-4)


def test_large_finite_weights_whose_sum_overflows_are_still_finite() -> None:
    layer, _, _ = make_layer()
    answer = layer.load_slot(0, torch.ones(2, IN), torch.full((OUT, 2), 3e37), 1.0)
    # torch's copies answer with sums, and the quick check cannot tell; the kernel checks each weight
    assert bool(answer.isfinite().all()) == (KERNEL is not None)
    assert layer.slot_is_finite(0)  # the exact check decides, and the adapter is served


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_host_weights_load_into_a_cuda_slot_and_serve_a_mixed_pass() -> None:
    """Adapter files are parsed into host tensors; the slots live on the GPU (no cross-device arithmetic)."""
    torch.manual_seed(0)
    cuda = torch.device("cuda")
    routing = LoraRouting()
    base = nn.Linear(IN, OUT).to(cuda)
    layer = MultiLoraLinear(base, IN, OUT, SLOTS, MAX_RANK, routing, cuda, torch.float32)
    host = {0: (torch.randn(4, IN, dtype=torch.bfloat16), torch.randn(OUT, 4, dtype=torch.bfloat16), 2.0),
            1: (torch.randn(8, IN), torch.randn(OUT, 8), 0.5)}
    for slot, (a, b, scale) in host.items():
        assert layer.load_slot(slot, a, b, scale).isfinite().all()
    x = torch.randn(4, IN)
    routing.route([0, 1, SLOTS, 0], SLOTS, {0: 4, 1: 8}.__getitem__, cuda)
    out = layer(x.to(cuda)).cpu()
    base_out = base(x.to(cuda)).cpu()
    for row, slot in enumerate([0, 1, None, 0]):
        want = base_out[row]
        if slot is not None:
            a, b, scale = host[slot]
            want = want + x[row] @ a.float().T @ (b.float() * scale).T
        torch.testing.assert_close(out[row], want, rtol=1e-3, atol=1e-3)


def test_slots_in_a_memory_budget_count_every_layer_and_the_zero_slot() -> None:
    layers = {"q": [4, 6], "v": [4, 2]}  # rank 2, float32: (10 + 6) * 2 * 4 = 128 bytes a slot
    assert slots_in_budget(layers, 2, torch.float32, 128 * 10) == 9
    assert slots_in_budget(layers, 2, torch.bfloat16, 128 * 10) == 19
    assert slots_in_budget(layers, 2, torch.float32, 256) == 1
    with pytest.raises(ValueError, match="holds no adapter slot: one needs"):
        slots_in_budget(layers, 2, torch.float32, 255)
    # B in column blocks of 4: out 6 takes 8 columns, out 2 takes 4: (8 + 12) * 2 * 4 = 160 bytes a slot
    assert slots_in_budget(layers, 2, torch.float32, 160 * 10, b_chunk=4) == 9
    assert slots_in_budget(layers, 2, torch.float32, 160 * 10 - 1, b_chunk=4) == 8
    # int8: a byte a weight and a float32 scale for each rank's row of A and of B: 40 + 2 * 2 * 2 * 4 = 72
    assert slots_in_budget(layers, 2, torch.int8, 72 * 10, b_chunk=4) == 9
    assert slots_in_budget(layers, 2, torch.int8, 72 * 10 - 1, b_chunk=4) == 8


def test_a_slot_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="adapter_slots_mb must be at least 1"):
        WorkerConfig(model_path=Path("m"), model_name="m", blob_url="b", adapter_slots_mb=0)


@pytest.mark.parametrize("limit", [0.0, -0.01, 1.5, float("nan")])
def test_the_int8_rounding_limit_is_a_fraction_above_zero(tmp_path: Path, limit: float) -> None:
    with pytest.raises(ValueError, match="lora_int8_max_error must be in"):
        WorkerConfig(model_path=Path("m"), model_name="m", blob_url="b", lora_int8_max_error=limit)
    with pytest.raises(ValidationError, match="lora_int8_max_error"):
        Settings(data_dir=tmp_path, lora_int8_max_error=limit)


def test_the_int8_rounding_limit_reaches_a_local_or_remote_worker(tmp_path: Path) -> None:
    assert WorkerConfig(model_path=Path("m"), model_name="m", blob_url="b").lora_int8_max_error == 0.03
    local = Settings(data_dir=tmp_path, lora_int8_max_error=0.05).worker_config(0, "m", "m", "cpu")
    assert local.lora_int8_max_error == 0.05 and WorkerConfig.from_json(local.to_json()) == local
    parser = argparse.ArgumentParser()
    WorkerConfig.add_arguments(parser)
    flags = parser.parse_args(["--model-path", "m", "--model-name", "m", "--blob-url", "b",
                               "--lora-int8-max-error", "0.1"])
    assert WorkerConfig.from_arguments(flags).lora_int8_max_error == 0.1


def test_the_slot_dtype_is_one_the_engine_serves_and_reaches_a_local_or_remote_worker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lora_dtype must be one of auto, float32, bfloat16, int8, not 'float16'"):
        WorkerConfig(model_path=Path("m"), model_name="m", blob_url="b", lora_dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="lora_dtype"):
        Settings(data_dir=tmp_path, lora_dtype="float16")  # type: ignore[arg-type]
    local = Settings(data_dir=tmp_path, lora_dtype="bfloat16").worker_config(0, "m", "m", "cpu")
    assert local.lora_dtype == "bfloat16" and WorkerConfig.from_json(local.to_json()) == local
    parser = argparse.ArgumentParser()
    WorkerConfig.add_arguments(parser)
    flags = parser.parse_args(["--model-path", "m", "--model-name", "m", "--blob-url", "b", "--lora-dtype", "bfloat16"])
    assert WorkerConfig.from_arguments(flags).lora_dtype == "bfloat16"
    assert WorkerConfig(model_path=Path("m"), model_name="m", blob_url="b").lora_dtype == "auto"


def test_auto_slots_are_bfloat16_where_the_kernel_or_a_gpu_computes_and_float32_on_torchs_cpu_matmuls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert lora_slot_dtype("float32", cpu) == torch.float32 and lora_slot_dtype("bfloat16", cpu) == torch.bfloat16
    assert lora_slot_dtype("auto", torch.device("cuda")) == torch.bfloat16  # no GPU needed to decide
    built = lora_delta_kernel() is not None
    assert lora_slot_dtype("auto", cpu) == (torch.bfloat16 if built else torch.float32)
    monkeypatch.setattr(runtime, "lora_delta_kernel", lambda: None)  # no C compiler: torch widens every step
    assert lora_slot_dtype("auto", cpu) == torch.float32
    assert lora_slot_dtype("bfloat16", cpu) == torch.bfloat16  # asked for: still honoured


def test_int8_slots_are_for_a_cpu_with_the_kernel_and_refused_elsewhere_at_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"int8 needs a CPU worker with the native LoRA kernel \(this one: cuda\)"):
        lora_slot_dtype("int8", torch.device("cuda"))
    if lora_delta_kernel() is not None:
        assert lora_slot_dtype("int8", cpu) == torch.int8
    monkeypatch.setattr(runtime, "lora_delta_kernel", lambda: None)
    with pytest.raises(ValueError, match="this one: cpu, no kernel built"):
        lora_slot_dtype("int8", cpu)
    with pytest.raises(ValueError, match="int8 adapter slots are the native CPU kernel's"):
        MultiLoraLinear(nn.Linear(4, 4), 4, 4, 2, 2, LoraRouting(kernel=None), cpu, torch.int8)


class Block(nn.Module):
    """q/k/v read one tensor, as attention does; o reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(IN, OUT), nn.Linear(IN, 4), nn.Linear(IN, 4)
        self.o_proj = nn.Linear(OUT, IN)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = self.q_proj(x)
        return q, self.k_proj(x), self.v_proj(x), self.o_proj(q)


def block_pair() -> tuple[Block, Block, LoraRouting, LoraRouting]:
    """The same block twice, one with the shared q/k/v shrink and one with every layer on its own;
    the same adapters in both (k has none in slot 1: an adapter need not target every sibling)."""
    torch.manual_seed(0)
    blocks, routings = (Block(), Block()), (new_routing(), new_routing())
    blocks[1].load_state_dict(blocks[0].state_dict())
    modules = {"q_proj": [IN, OUT], "k_proj": [IN, 4], "v_proj": [IN, 4], "o_proj": [OUT, IN]}
    shared = install_lora_layers(blocks[0], modules, SLOTS, MAX_RANK, routings[0], torch.device("cpu"), torch.float32)
    for name, (i, o) in modules.items():
        setattr(blocks[1], name, MultiLoraLinear(getattr(blocks[1], name), i, o, SLOTS, MAX_RANK, routings[1],
                                                 torch.device("cpu"), torch.float32))
    assert shared["q_proj"].shared is shared["v_proj"].shared and shared["o_proj"].shared.members == 1
    for slot, rank in ((0, 4), (1, 8), (2, 2)):
        for name, (i, o) in modules.items():
            if slot == 1 and name == "k_proj":
                continue
            a, b = torch.randn(rank, i), torch.randn(o, rank)
            for block in blocks:
                getattr(block, name).load_slot(slot, a, b, 0.5)
    return *blocks, *routings  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("slots", "lengths"),
    [
        ([1, 0, 2, None], [1, 1, 1, 1]),  # decode rows on several adapters: the grouped shrink
        ([1, 0, 2, 0], [1, 30, 1, 20]),  # prompt chunks beside decode rows: their own shrinks
        ([2, 2], [1, 3]),  # one adapter on every token
        ([None, 1, None], [2, 1, 3]),  # one adapter beside base tokens
    ],
)
def test_layers_sharing_an_input_give_what_separate_layers_give(slots: list[int | None], lengths: list[int]) -> None:
    shared, separate, route_shared, route_separate = block_pair()
    x = torch.randn(sum(lengths), IN)
    # A second pass on the same tensor, routed to other slots, computes afresh: nothing stale is kept.
    for pass_slots in (slots, [None if s is None else (s + 1) % SLOTS for s in slots]):
        for routing in (route_shared, route_separate):
            route(routing, pass_slots, {0: 4, 1: 8, 2: 2}, lengths)
        got, want = shared(x), separate(x)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_sibling_called_with_another_tensor_does_not_reuse_the_shrink() -> None:
    shared, separate, route_shared, route_separate = block_pair()
    for routing in (route_shared, route_separate):
        route(routing, [1, 0, 2], {0: 4, 1: 8, 2: 2})
    x, other = torch.randn(3, IN), torch.randn(3, IN)
    for block in (shared, separate):
        block.v_proj(x)  # out of order, and q with another input between
    torch.testing.assert_close(shared.q_proj(other), separate.q_proj(other))
    torch.testing.assert_close(shared.k_proj(x), separate.k_proj(x))
    torch.testing.assert_close(shared.v_proj(x), separate.v_proj(x))
