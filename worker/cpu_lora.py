"""LoRA of the decode rows on the CPU: one native call per adapted layer for all of them.

With several adapters in a decode pass torch gathered the tokens by slot, ran two batched matmuls
on views of the slot stacks and scattered the result back; with one adapter, two matmuls and an
add. Each of those ~6 operator calls costs tens of microseconds on the CPU before any arithmetic
(the matrices are [16, 576] x [576, 48]), and a step of the embedded model has 210 adapted layers.
`worker/csrc/lora_delta.c` adds every decode token's delta in place in one call a layer, reading
each token's own slot of the stacks; prompt chunks (a slot with many tokens) stay on torch's
matmuls, which are the faster there. The kernel reads B stacks in column blocks
(`LoraDelta.blocked`), one contiguous run a slot; layers built for it keep theirs so. The same
library fills adapter slots from the host tier (`LoraDelta.fill`: one call a layer, converting,
transposing, scaling and checking as it copies). Its slot stacks hold float32, bfloat16 or int8 weights;
int8 ones (`LORA_DTYPE=int8`, opt-in, this kernel's alone) keep a float32 scale for each rank's row
(`Scales`, `quantize_rows`), and torch's paths read float32 copies of their values.

Compiled when a worker first needs it (`worker.native`), used only if it computes what torch
computes on a probe; otherwise the engine keeps torch's path (logged).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from worker import native

SOURCE = native.CSRC / "lora_delta.c"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)  # of the slot stacks; activations and sums are float32
INT8 = torch.int8  # slot stacks of int8 weights, each rank's row with a float32 scale (`quantize_rows`)
SLOT_DTYPES = (*WEIGHT_DTYPES, INT8)  # what the kernel reads
_WEIGHT_CODES = {torch.float32: 0, torch.bfloat16: 1, INT8: 2}  # the kernel's `wt`
FILE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # of adapter weights `LoraDelta.fill` reads
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


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
class Scales:
    """The float32 scales of a layer's int8 stacks: each rank's row of A (`a`, [slots + 1, max_rank], a view
    of the members' interleaved [slots + 1, max_rank, members]) and of B transposed (`b`, [slots + 1,
    max_rank]); a weight's value is its int8 times its row's scale."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class SlotTarget:
    """Where `LoraDelta.fill` writes a layer's slots: addresses, strides and sizes of its stacks, which are
    written in place, never replaced."""

    a: int  # slot 0's A rows
    a_slot_bytes: int
    a_row: int  # weights between one rank's A row and the next
    in_features: int
    b: int  # slot 0's B, [chunks, max_rank, chunk] dense (`LoraDelta.blocked`)
    b_slot_bytes: int
    out: int
    max_rank: int
    slots: int  # the zero slot included
    bf16: bool
    a_scale: int = 0  # int8 stacks: slot 0's scales of A's rows, a_scale_row floats apart, and of B's
    a_scale_slot_bytes: int = 0
    a_scale_row: int = 0
    b_scale: int = 0
    b_scale_slot_bytes: int = 0


class LoraDelta:
    """The compiled kernel: `add` adds the LoRA deltas of a pass's routed tokens to one layer's output;
    `run` does the same for the engine's layers, their arguments prepared (`layer`, `tiles`)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._kernel = library.lora_delta
        self._kernel.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, ctypes.c_int,
                                 _I64, _PTR, _I64, ctypes.c_int, _PTR, _I64, ctypes.c_int, _PTR, _PTR]
        self._kernel.restype = None
        # run(layer.address, tiles.address, x, h, shrink, y, rank, threads): x [tokens, in] and y [tokens, out]
        # float32, dense; h as in `add`. Eight plain integers: ctypes converts them in a fraction of the time
        # it took for the twenty of `add`, 210 layers a step.
        self.run: Callable[[int, int, int, int, bool, int, int, int], None] = library.lora_delta_layer
        library.lora_delta_layer.argtypes = [_PTR, _PTR, _PTR, _PTR, ctypes.c_int, _PTR, _I64, ctypes.c_int]
        library.lora_delta_layer.restype = None
        self.tile = int(library.lora_tile())
        self.chunk = int(library.lora_chunk())  # output columns in one block of a B stack (`blocked`)
        self._fill = library.lora_fill
        self._fill.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _I64, _PTR, _INT, _I64, _I64, _PTR, ctypes.c_float, _INT]
        self._fill.restype = _I64
        self._fill_int8 = library.lora_fill_int8
        self._fill_int8.argtypes = [_PTR, _INT, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _INT, _I64, _I64, _PTR, _PTR,
                                    ctypes.c_float, _PTR]
        self._fill_int8.restype = _I64

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

    def blocks(self, out: int) -> int:
        """Column blocks of a B stack `out` wide."""
        return -(-out // self.chunk)

    def blocked(self, b: torch.Tensor) -> torch.Tensor:
        """B stacks [..., rank, out] (transposed) as the kernel reads them, [..., blocks, rank, chunk]: block c
        holds columns [c * chunk, (c + 1) * chunk) of every rank, zeros past `out`. A copy."""
        padded = torch.nn.functional.pad(b, (0, self.blocks(b.shape[-1]) * self.chunk - b.shape[-1]))
        return padded.unflatten(-1, (-1, self.chunk)).transpose(-3, -2).contiguous()

    @staticmethod
    def unblocked(b: torch.Tensor, out: int) -> torch.Tensor:
        """`blocked`'s inverse: [..., blocks, rank, chunk] -> [..., rank, out] (a copy)."""
        return b.transpose(-3, -2).flatten(-2)[..., :out]

    def slot_target(self, a: torch.Tensor, b: torch.Tensor, out: int,
                    scales: Scales | None = None) -> SlotTarget | None:
        """`fill`'s destination for a layer's stacks a: [slots + 1, max_rank, in] (rows dense; a view of
        interleaved stacks) and b: [slots + 1, blocks, max_rank, chunk] (`blocked`, dense) of `out` columns,
        with their `scales` where they hold int8; None where it cannot write them."""
        if (a.dtype != b.dtype or a.dtype not in SLOT_DTYPES or a.device.type != "cpu" or b.device.type != "cpu"
                or a.stride(2) != 1 or not b.is_contiguous()
                or b.shape[1:] != (self.blocks(out), a.shape[1], self.chunk) or (scales is None) == (a.dtype == INT8)):
            return None
        size = a.element_size()
        target = SlotTarget(a.data_ptr(), a.stride(0) * size, a.stride(1), a.shape[2], b.data_ptr(),
                            b.stride(0) * size, out, a.shape[1], b.shape[0], a.dtype == torch.bfloat16)
        if scales is None:
            return target
        if not _scales_fit(scales, a.shape[0], a.shape[1]):
            return None
        return dataclasses.replace(target, a_scale=scales.a.data_ptr(), a_scale_slot_bytes=scales.a.stride(0) * 4,
                                   a_scale_row=scales.a.stride(1), b_scale=scales.b.data_ptr(),
                                   b_scale_slot_bytes=scales.b.stride(0) * 4)

    def fill(self, target: SlotTarget, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float,
             rounding: ctypes.c_float | None = None) -> int | None:
        """Copy A [rank, in] into the slot and B [out, rank] into it transposed and times `scale`, in the
        slots' dtype, as torch's copies would (int8: as `quantize_rows` would, and `rounding`, if given,
        set to what `rounding_error` says of it); return how many of the weights are not finite there.
        None where the kernel does not read these tensors (another dtype or device, a layout or shape it
        does not take): the caller copies with torch."""
        a_dtype, b_dtype = FILE_DTYPES.get(a.dtype), FILE_DTYPES.get(b.dtype)
        if a_dtype is None or b_dtype is None or not (a.is_cpu and b.is_cpu):
            return None
        if not (a.is_contiguous() and b.is_contiguous()):
            return None
        rank = a.shape[0]
        if a.shape != (rank, target.in_features) or b.shape != (target.out, rank) or rank > target.max_rank:
            return None
        if not 0 <= slot < target.slots:
            raise IndexError(f"slot {slot} is not one of the {target.slots} slots")
        a_slot, b_slot = target.a + slot * target.a_slot_bytes, target.b + slot * target.b_slot_bytes
        if target.a_scale:
            return int(self._fill_int8(a.data_ptr(), a_dtype, rank, target.in_features, a_slot, target.a_row,
                                       target.a_scale + slot * target.a_scale_slot_bytes, target.a_scale_row,
                                       b.data_ptr(), b_dtype, target.out, target.max_rank, b_slot,
                                       target.b_scale + slot * target.b_scale_slot_bytes, scale,
                                       None if rounding is None else ctypes.addressof(rounding)))
        return int(self._fill(a.data_ptr(), a_dtype, rank, target.in_features, a_slot, target.a_row, b.data_ptr(),
                              b_dtype, target.out, target.max_rank, b_slot, scale, target.bf16))

    def layer(self, a: torch.Tensor, b: torch.Tensor, member: int, out: int,
              scales: Scales | None = None) -> native.ArgTable:
        """`run`'s arguments ([A's address, max_rank, members, in, B's address, out, weight code, member, A's
        scales, B's scales]) for the `member`-th layer of the stacks a: [slots + 1, max_rank, members, in]
        and b: [slots + 1, blocks, max_rank, chunk] (`blocked`) of `out` columns, both of one of
        `SLOT_DTYPES`, contiguous; int8 stacks with their `scales` (`Scales.a` a view of the members'
        [slots + 1, max_rank, members], contiguous)."""
        if a.dtype != b.dtype or a.dtype not in SLOT_DTYPES or not (a.is_contiguous() and b.is_contiguous()):
            raise ValueError(f"the kernel takes contiguous float32, bfloat16 or int8 stacks, "
                             f"not {a.dtype} and {b.dtype}")
        _, max_rank, members, in_features = a.shape
        if b.shape != (a.shape[0], self.blocks(out), max_rank, self.chunk):
            raise ValueError(f"B stacks {tuple(b.shape)} are not in the kernel's blocks of {self.chunk} columns "
                             f"for {a.shape[0]} slots, rank {max_rank} and {out} columns")
        a_scale = b_scale = 0
        if a.dtype == INT8:
            if scales is None or not _scales_fit(scales, a.shape[0], max_rank):
                raise ValueError(f"int8 stacks need float32 scales for {a.shape[0]} slots and rank {max_rank}")
            if scales.a.stride() != (max_rank * members, members):
                raise ValueError("int8 stacks' A scales must be a view of the members' [slots + 1, max_rank, members]")
            a_scale, b_scale = scales.a.data_ptr() - 4 * member, scales.b.data_ptr()  # the members' first
        return native.arg_table(a.data_ptr(), max_rank, members, in_features, b.data_ptr(), out,
                                _WEIGHT_CODES[a.dtype], member, a_scale, b_scale)

    def add(
        self,
        x: torch.Tensor,  # [tokens, in] float32, last dim dense: the layer's input
        tiles: TokenTiles,  # the tokens to add a delta to, and their slots
        a: torch.Tensor,  # [slots + 1, max_rank, members, in] (`SLOT_DTYPES`), contiguous: the members' A stacks
        rank: int,
        h: torch.Tensor,  # [tokens, members, rank] float32, contiguous (or a larger buffer): the shrinks
        shrink: bool,  # compute h (for every member) first; else h holds them already
        member: int,
        b: torch.Tensor,  # [slots + 1, blocks, max_rank, chunk], a's dtype, contiguous: this layer's B (`blocked`)
        y: torch.Tensor,  # [tokens, out] float32, last dim dense: the base output, added to in place
        threads: int | None = None,
        scales: Scales | None = None,  # int8 stacks' scales (`layer`)
    ) -> None:
        values = self.layer(a, b, member, y.shape[1], scales).values
        _, max_rank, members, in_features, _, out, wt, _, a_scale, b_scale = values
        self._kernel(x.data_ptr(), x.stride(0), tiles.order, tiles.count, tiles.start, tiles.slot, a.data_ptr(),
                     max_rank, members, in_features, rank, h.data_ptr(), shrink, member, b.data_ptr(), out, wt,
                     y.data_ptr(), y.stride(0), torch.get_num_threads() if threads is None else threads, a_scale,
                     b_scale)


def _scales_fit(scales: Scales, slots: int, max_rank: int) -> bool:
    """Whether int8 stacks' scales are float32 on the CPU, one per slot and rank, B's contiguous."""
    return (scales.a.dtype == scales.b.dtype == torch.float32 and scales.a.is_cpu and scales.b.is_cpu
            and scales.a.shape == scales.b.shape == (slots, max_rank) and scales.b.is_contiguous())


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n, width] (float32) as int8 [n, width] and float32 scales [n]: a row's scale is its largest
    magnitude / 127, each value its multiple of that rounded to nearest even (0 where the scale is). Not
    finite rows get a scale that is not finite either (`torch.amax` keeps NaN)."""
    scale = rows.abs().amax(dim=-1) / 127.0 if rows.shape[-1] else rows.new_zeros(rows.shape[:-1])
    q = torch.where(scale[:, None] > 0, torch.round(rows / scale[:, None]), 0.0).clamp(-127.0, 127.0)
    return q.nan_to_num(0.0).to(INT8), scale


def rounding_error(a: torch.Tensor, b_t: torch.Tensor) -> float:
    """What int8 rows lose of a layer's A [rank, in] and scaled B transposed [rank, out] (float32): the
    larger of the two's root-mean-square rounding error relative to their root mean square (0 for all
    zeros). ~0.6% on trained adapters and ~0.8% on Gaussian ones at rank 16 on the embedded model; rows
    with a few weights far above the rest lose more (their step is 1/127 of the largest)."""
    def lost(rows: torch.Tensor) -> float:
        q, scale = quantize_rows(rows)
        squares = rows.double().square().sum()
        errors = (rows.double() - q.double() * scale.double()[:, None]).square().sum()
        return float((errors / squares).sqrt()) if squares > 0 else 0.0

    return max(lost(a), lost(b_t))


@functools.cache
def lora_delta_kernel() -> LoraDelta | None:
    """The kernel for this process, compiled once; None (logged) where it cannot be built or is wrong
    (`worker.cpu_lora_probe`, which reads this module's types: imported here, not at the top)."""
    from worker import cpu_lora_probe

    return native.load(SOURCE, LoraDelta, cpu_lora_probe.probe_error, "decode rows' LoRA", "torch's matmuls")
