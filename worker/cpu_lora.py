"""LoRA of the decode rows on the CPU: one native call per adapted layer for all of them.

With several adapters in a decode pass torch gathered the tokens by slot, ran two batched matmuls
on views of the slot stacks and scattered the result back; with one adapter, two matmuls and an
add. Each of those ~6 operator calls costs tens of microseconds on the CPU before any arithmetic
(the matrices are [16, 576] x [576, 48]), and a step of the embedded model has 210 adapted layers.
`worker/csrc/lora_delta.c` adds every decode token's delta in place in one call a layer, reading
each token's own slot of the stacks; prompt chunks (a slot with many tokens) stay on torch's
matmuls, which are the faster there.

Compiled when a worker first needs it (`worker.native`), used only if it computes what torch
computes on a probe; otherwise the engine keeps torch's path (logged).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker import native

SOURCE = native.CSRC / "lora_delta.c"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)  # of the slot stacks; activations and sums are float32
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@dataclass(frozen=True)
class TokenTiles:
    """A pass's routed tokens for the kernel, in tiles of up to `LoraDelta.tile` tokens on one slot
    (each weight a tile reads serves all its tokens), made once a pass (`LoraDelta.tiles`).

    `table` holds [order | start | slot]: the tokens' indices tile after tile, where each tile starts
    in `order` (and where the last ends), and each tile's slot; the three addresses are kept, and
    `header` holds them with the count for `LoraDelta.run` (at `address`).
    """

    table: torch.Tensor  # int64 [tokens routed + 2 * count + 1]
    count: int  # tiles
    order: int  # addresses in `table`
    start: int
    slot: int
    header: ctypes.Array[ctypes.c_int64]  # [order, count, start, slot]
    address: int  # of `header`


@dataclass(frozen=True)
class LayerArgs:
    """What `LoraDelta.run` needs of one layer, kept by the layer: `values` [A's address, max_rank, members,
    in, B's address, out, bfloat16 or not, member] at `address`. The stacks are written in place, never
    replaced, so the addresses hold as long as the layer."""

    values: ctypes.Array[ctypes.c_int64]
    address: int


class LoraDelta:
    """The compiled kernel: `add` adds the LoRA deltas of a pass's routed tokens to one layer's output;
    `run` does the same for the engine's layers, their arguments prepared (`layer`, `tiles`)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._kernel = library.lora_delta
        self._kernel.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, ctypes.c_int,
                                 _I64, _PTR, _I64, ctypes.c_int, _PTR, _I64, ctypes.c_int]
        self._kernel.restype = None
        # run(layer.address, tiles.address, x, h, shrink, y, rank, threads): x [tokens, in] and y [tokens, out]
        # float32, dense; h as in `add`. Eight plain integers: ctypes converts them in a fraction of the time
        # it took for the twenty of `add`, 210 layers a step.
        self.run: Callable[[int, int, int, int, bool, int, int, int], None] = library.lora_delta_layer
        library.lora_delta_layer.argtypes = [_PTR, _PTR, _PTR, _PTR, ctypes.c_int, _PTR, _I64, ctypes.c_int]
        library.lora_delta_layer.restype = None
        self.tile = int(library.lora_tile())

    def tiles(self, slots: Sequence[int], skip: int) -> TokenTiles:
        """Tiles of the tokens whose slot (`slots[token]`) is not `skip`, grouped by slot in token order."""
        by_slot: dict[int, list[int]] = {}
        for token, slot in enumerate(slots):
            if slot != skip:
                by_slot.setdefault(slot, []).append(token)
        order: list[int] = []
        starts: list[int] = []
        tile_slots: list[int] = []
        for slot, tokens in by_slot.items():
            for first in range(0, len(tokens), self.tile):
                starts.append(len(order))
                tile_slots.append(slot)
                order.extend(tokens[first : first + self.tile])
        starts.append(len(order))
        table = torch.tensor(order + starts + tile_slots, dtype=torch.int64)
        base = table.data_ptr()
        order_at, start_at, slot_at = base, base + 8 * len(order), base + 8 * (len(order) + len(starts))
        header = (ctypes.c_int64 * 4)(order_at, len(tile_slots), start_at, slot_at)
        return TokenTiles(table, len(tile_slots), order_at, start_at, slot_at, header, ctypes.addressof(header))

    @staticmethod
    def layer(a: torch.Tensor, b: torch.Tensor, member: int) -> LayerArgs:
        """`run`'s arguments for the `member`-th layer of the stacks a: [slots + 1, max_rank, members, in]
        and b: [slots + 1, max_rank, out], both float32 or both bfloat16 (`WEIGHT_DTYPES`), contiguous."""
        if a.dtype != b.dtype or a.dtype not in WEIGHT_DTYPES or not (a.is_contiguous() and b.is_contiguous()):
            raise ValueError(f"the kernel takes contiguous float32 or bfloat16 stacks, not {a.dtype} and {b.dtype}")
        _, max_rank, members, in_features = a.shape
        values = (ctypes.c_int64 * 8)(a.data_ptr(), max_rank, members, in_features, b.data_ptr(), b.shape[2],
                                      a.dtype == torch.bfloat16, member)
        return LayerArgs(values, ctypes.addressof(values))

    def add(
        self,
        x: torch.Tensor,  # [tokens, in] float32, last dim dense: the layer's input
        tiles: TokenTiles,  # the tokens to add a delta to, and their slots
        a: torch.Tensor,  # [slots + 1, max_rank, members, in] float32 or bfloat16, contiguous: the members' A stacks
        rank: int,
        h: torch.Tensor,  # [tokens, members, rank] float32, contiguous (or a larger buffer): the shrinks
        shrink: bool,  # compute h (for every member) first; else h holds them already
        member: int,
        b: torch.Tensor,  # [slots + 1, max_rank, out], a's dtype, contiguous: this layer's B stack, transposed
        y: torch.Tensor,  # [tokens, out] float32, last dim dense: the base output, added to in place
        threads: int | None = None,
    ) -> None:
        _, max_rank, members, in_features, _, out, bf16, _ = self.layer(a, b, member).values
        self._kernel(x.data_ptr(), x.stride(0), tiles.order, tiles.count, tiles.start, tiles.slot, a.data_ptr(),
                     max_rank, members, in_features, rank, h.data_ptr(), shrink, member, b.data_ptr(), out, bf16,
                     y.data_ptr(), y.stride(0), torch.get_num_threads() if threads is None else threads)


@functools.cache
def lora_delta_kernel() -> LoraDelta | None:
    """The kernel for this process, compiled once; None (logged) where it cannot be built or is wrong."""
    return native.load(SOURCE, LoraDelta, probe_error, "decode rows' LoRA", "torch's matmuls")


def reference(x: torch.Tensor, slots: torch.Tensor, skip: int, a: torch.Tensor, rank: int, member: int,
              b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What `LoraDelta.add` computes, with torch: y + B[slot] . (A[slot] . x) per routed token."""
    out = y.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot != skip:
            out[t] += (a[slot, :rank, member].float() @ x[t]) @ b[slot, :rank].float()
    return out


def probe_error(kernel: LoraDelta) -> float:
    """Largest difference from torch over the members of a shared input, ranks and widths that are not
    multiples of the kernel's blocks, tokens on one slot (more than a tile's), several and none, for
    float32 and bfloat16 stacks."""
    generator = torch.Generator().manual_seed(0)
    slot_count, max_rank, members, in_features, out_features, rank = 4, 8, 3, 40, 70, 7
    x = torch.randn(10, in_features, generator=generator)
    slots = torch.tensor([2, slot_count, 0, 2, 3, 1, 2, 2, 2, 2])  # slot 2: more tokens than one tile
    h = torch.empty(len(slots), members, rank)
    error = 0.0
    for dtype in WEIGHT_DTYPES:
        a = torch.randn(slot_count + 1, max_rank, members, in_features, generator=generator).to(dtype)
        b = torch.randn(slot_count + 1, max_rank, out_features, generator=generator).to(dtype)
        for member in range(members):
            y = torch.randn(len(slots), out_features, generator=generator)
            expected = reference(x, slots, slot_count, a, rank, member, b, y)
            kernel.add(x, kernel.tiles(slots.tolist(), slot_count), a, rank, h, member == 0, member, b, y)
            error = max(error, float(((y - expected) / expected.abs().clamp(min=1.0)).abs().max()))
            if not y.isfinite().all():
                return float("inf")
    return error
