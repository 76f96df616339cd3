"""LoRA applied by the engine's own layer, a different adapter on every row.

Each adapted linear layer keeps all resident adapters stacked in slot tensors and adds
`B[slot] · (A[slot] · x)` per token on top of whatever the base layer is (bitsandbytes
NF4, GPTQ/AWQ or plain): with one adapter in the pass, two plain matmuls on views of
its slot; with several, the tokens of slots with few of them (decode rows) grouped by slot
for two batched matmuls on views of the slot stacks, and each slot with many (a prompt
chunk) two matmuls of its own (which tokens take which path: `worker.lora_routing`, once a
pass). Layers that read the same input (q/k/v, gate/up: a `SharedInput`)
keep their A stacks interleaved in one tensor, so the first of them to run gathers the tokens
and shrinks them for all (one matmul where there were three), and the others take their share.
On the CPU the decode tokens' share of all this is one native call per layer instead
(`worker.cpu_lora`, `LoraRouting.kernel`); the torch paths keep the prompt chunks, and everything
where the kernel is not built (no C compiler, a GPU). The slots hold bfloat16 by default where
the kernel or a GPU computes (`lora_dtype`): half the bytes to read a step, widened to float32 as
they are used on the CPU; on request int8 with a scale a rank's row (`MultiLoraLinear.scales`), which
only the kernel reads in place (torch's paths, prompt chunks, take float32 copies).
Adapter weights are copied into the slot tensors from their own files: the base module is never
read or written, so bitsandbytes' CPU repacking bug (docs/architecture.md) cannot touch it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
from torch import nn

from worker import native
from worker.cpu_lora import INT8, LoraDelta, Scales, SlotTarget, quantize_rows, rounding_error
from worker.lora_routing import LoraRouting

SERIAL_TOKENS = 16  # a CPU pass of at most this many tokens on one adapter runs its LoRA on one thread (_forward)
_FINITE, _NOT_FINITE = torch.zeros(2), torch.full((2,), torch.inf)  # `load_slot`'s answers from the kernel
VIEWS_KEPT = 64  # per layer and kind: slot (and span) views kept for reuse; spans x ranks could be thousands


def by_member(h: torch.Tensor, rank: int, members: int) -> torch.Tensor:
    """A shrink [..., rank * members] (rank-major, as A is interleaved) as [..., members, rank], so each
    member's share has unit stride: matmuls read a strided last dimension many times slower."""
    if members == 1:
        return h.unsqueeze(-2)
    return h.unflatten(-1, (rank, members)).transpose(-1, -2).contiguous()


class SharedInput:
    """The A stacks of `members` layers that read the same input, interleaved as
    [slots + 1, max_rank, members, in], and the last shrink computed from them.

    A member's own A stack is the view [:, :, member]; the shrink of rank r for all members is one
    matmul with [slots, r * members, in] (a view too), whose result [..., r, members] each member
    reads at [..., member]. The result is kept for the input tensor it was computed from, for the
    current pass, so the next member called with that same tensor reuses it.
    """

    def __init__(self, members: int, num_slots: int, max_rank: int, in_features: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.members = members
        self.a = torch.zeros(num_slots + 1, max_rank, members, in_features, device=device, dtype=dtype)
        # int8 stacks: each rank's row's scale (`worker.cpu_lora.quantize_rows`), interleaved like the rows
        self.a_scale = torch.zeros(num_slots + 1, max_rank, members, device=device) if dtype == INT8 else None
        self._input: torch.Tensor | None = None
        self._pass = -1
        self._shrinks: dict[object, torch.Tensor] = {}
        self._kernel_h = torch.empty(0, dtype=torch.float32)  # the native kernel's shrinks (CPU only), reused

    def shrink(self, x_in: torch.Tensor, pass_id: int, key: object,
               compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        found = self.kept(x_in, pass_id, key)
        if found is None:
            found = compute()
            self.keep(key, found)
        return found

    def kept(self, x_in: torch.Tensor, pass_id: int, key: object) -> torch.Tensor | None:
        """The shrink kept under `key` for this very input in this pass, if a member computed it."""
        if self.members == 1:
            return None
        if x_in is not self._input or pass_id != self._pass:
            self._input, self._pass, self._shrinks = x_in, pass_id, {}
        return self._shrinks.get(key)

    def keep(self, key: object, shrink: torch.Tensor) -> None:
        """Keep a shrink for the other members (after `kept` found none for the same input and pass)."""
        if self.members > 1:
            self._shrinks[key] = shrink

    def kernel_shrinks(self, x_in: torch.Tensor, pass_id: int, per_member: int) -> tuple[torch.Tensor, bool]:
        """Where the native kernel keeps the shrinks of this input ([tokens, members, rank] at the
        start of a buffer that lives as long as the layer), and whether they still have to be computed
        (the first member called with it in the pass computes them for all)."""
        if self.kept(x_in, pass_id, "kernel") is not None:
            return self._kernel_h, False
        if self._kernel_h.numel() < per_member * self.members:
            self._kernel_h = torch.empty(per_member * self.members, dtype=torch.float32)
        self.keep("kernel", self._kernel_h)
        return self._kernel_h, True

    def release(self) -> None:
        """The last member has run: nothing holds the input or the shrinks past the layer."""
        self._input, self._shrinks = None, {}


class MultiLoraLinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        num_slots: int,
        max_rank: int,
        routing: LoraRouting,
        device: torch.device,
        dtype: torch.dtype,
        shared: tuple[SharedInput, int] | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        # The extra last slot stays zero: rows without an adapter point at it.
        self.shared, self.member = shared or (SharedInput(1, num_slots, max_rank, in_features, device, dtype), 0)
        self.lora_a = self.shared.a[:, :, self.member]  # [slots + 1, max_rank, in], a view
        self.out_features = out_features
        # B transposed, [slots + 1, max_rank, out]; where the native kernel computes, in its column blocks
        # ([slots + 1, blocks, max_rank, chunk], `LoraDelta.blocked`): one contiguous run a slot for it,
        # a copy for torch's matmuls (prompt chunks), which `b_rows` makes.
        self.b_blocks = routing.kernel if device.type == "cpu" else None  # whose column blocks hold B; None: plain
        if dtype == INT8 and self.b_blocks is None:
            raise ValueError("int8 adapter slots are the native CPU kernel's: a layer without it cannot read them")
        kernel = self.b_blocks
        b_shape = (max_rank, out_features) if kernel is None else (kernel.blocks(out_features), max_rank, kernel.chunk)
        self.lora_b = torch.zeros(num_slots + 1, *b_shape, device=device, dtype=dtype)
        # int8 stacks (CPU, with the kernel): the float32 scales of A's and B's rows, one per slot and rank
        a_scale = self.shared.a_scale
        self.scales = None if a_scale is None else Scales(a_scale[:, :, self.member],
                                                          torch.zeros(num_slots + 1, max_rank, device=device))
        self.filled: set[int] = set()  # slots holding weights for this layer
        self.written_rank = [0] * (num_slots + 1)  # per slot: rows [0, written_rank) may be nonzero
        # int8 stacks: per slot, what rounding to them lost of the weights loaded (`cpu_lora.rounding_error`)
        self.rounding = [0.0] * (num_slots + 1)
        self._rounding = ctypes.c_float()  # where the kernel's fill writes it
        # (slot, rank) -> (every member's A [in, rank * members], this layer's B [rank, out]): views of
        # the stacks, made once; the stacks are written in place, never replaced, so they stay current.
        self._slot_views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._span_views: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._kernel_args: native.ArgTable | None = None  # `LoraDelta.layer` of this layer, made on first use
        self._fill_target: SlotTarget | Literal[False] | None = None  # `LoraDelta.slot_target`, made on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._kernel_forward(x) if self.routing.kernel_only else self._forward(x)
        finally:
            if self.shared.members > 1 and self.member == self.shared.members - 1:
                self.shared.release()  # members run in order (q, k, v): this one is the last

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = self.routing
        if route.slots is None or self.filled.isdisjoint(route.active):
            return y
        # One adapter in a decode pass: its LoRA matmuls are tiny ([16, 576] x [576, 48]) and splitting
        # each over the CPU's threads costs more than it saves. One thread for them, all for the base
        # layer around them. Interleaved rounds on 2 cores, batch 16: 1.02-1.08x the tokens/s over three
        # runs, batch 8 1.09x. Several adapters (the grouped bmm) measured 0.90-1.01x: they keep every
        # thread. The engine thread is the only one doing torch arithmetic.
        decode = (route.single is not None and route.kernel_tiles is None and route.slots.shape[0] <= SERIAL_TOKENS
                  and y.device.type == "cpu")
        threads = torch.get_num_threads() if decode else 1
        if threads > 1:
            torch.set_num_threads(1)
            try:
                return self._add_lora(x, y)
            finally:
                torch.set_num_threads(threads)
        return self._add_lora(x, y)

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        route = self.routing
        x_in, shape = x, y.shape
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])  # [tokens, in], [tokens, out]
        rank = route.rank
        # In the slots' dtype on a GPU. On the CPU in float32, bfloat16 slots widened as they are read:
        # its bfloat16 matmuls are slower, and would round the activations too.
        work = torch.float32 if x.device.type == "cpu" else self.lora_a.dtype
        if x.dtype != work:
            x = x.to(work)
        members, shared = self.shared.members, self.shared

        def shrink_and_expand(key: object, tokens: Callable[[], torch.Tensor], slot: int) -> torch.Tensor:
            """[tokens, out] of one slot: this layer's share of the members' one shrink, expanded by its B."""
            a_t, b = self.slot_views(slot, rank)
            h = shared.shrink(x_in, route.pass_id, key, lambda: by_member(tokens() @ a_t.to(work), rank, members))
            return h[..., self.member, :] @ b.to(work)

        if route.kernel_tiles is not None:
            y = self._kernel_delta(x_in, x, y)
        if route.single is not None:
            slot, rows = route.single, route.single_rows
            if rows is None:
                delta = shrink_and_expand(slot, lambda: x, slot)
                return (y + delta.to(y.dtype)).view(shape)
            # Only the adapter's tokens are computed and added: base tokens keep the base layer's
            # exact values whatever the adapter holds (masking by x 0 turned its inf into NaN there).
            only = rows
            delta = shrink_and_expand(slot, lambda: x.index_select(0, only), slot)
            return y.index_add(0, rows, delta.to(y.dtype)).view(shape)
        groups = route.groups
        if groups is not None:
            def grouped() -> torch.Tensor:
                # Token `tokens` (a zero row) fills the positions of slots with fewer tokens, if any.
                source = x if groups.dense else torch.cat([x, x.new_zeros(1, x.shape[1])])
                xs = source.index_select(0, groups.take).view(-1, groups.per_slot, x.shape[1])  # [span, per_slot, in]
                return by_member(torch.bmm(xs, span_a.to(work)), rank, members)  # [span, per_slot, members, rank]

            span_a, span_b = self.span_views(groups.span.start, groups.span.stop, rank)
            h = shared.shrink(x_in, route.pass_id, "groups", grouped)[..., self.member, :]  # [span, per_slot, rank]
            delta = torch.bmm(h, span_b.to(work)).view(-1, y.shape[1])  # [span * per_slot, out]
            if groups.dense:  # every position is a token: no zero row's result to drop
                y = y.index_add(0, groups.take, delta.to(y.dtype))
            else:
                y = y.index_add(0, groups.rows, delta.index_select(0, groups.used).to(y.dtype))
        for slot, rows in route.big:
            delta = shrink_and_expand(("big", slot), partial(x.index_select, 0, rows), slot)
            y = y.index_add(0, rows, delta.to(y.dtype))
        return y.view(shape)

    def _kernel_delta(self, x_in: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [tokens, out] with the native kernel's deltas added (`LoraRouting.kernel`), in place where it can."""
        route = self.routing
        assert route.kernel is not None and route.kernel_tiles is not None
        out = y if y.dtype == torch.float32 and y.stride(-1) == 1 else y.float().contiguous()
        if x.dtype != torch.float32 or x.stride(-1) != 1:
            x = x.to(torch.float32).contiguous()
        h, shrink = self.shared.kernel_shrinks(x_in, route.pass_id, x.shape[0] * route.rank)
        route.kernel.add(x, route.kernel_tiles, self.shared.a, route.rank, h, shrink, self.member, self.lora_b, out,
                         scales=self.scales)
        return out if out is y else out.to(y.dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`_forward` of a pass whose adapter tokens are all the kernel's (decode steps), in as few
        steps as it takes: the general way spent ~20 microseconds of Python a layer, 210 layers a pass."""
        y = self.base(x)
        route = self.routing
        if self.filled.isdisjoint(route.active):
            return y
        if not (x.dtype == y.dtype == torch.float32 and x.is_contiguous() and y.is_contiguous()):
            return self._kernel_delta(x, x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])).view(y.shape)
        kernel, tiles = route.kernel, route.kernel_tiles
        assert kernel is not None and tiles is not None
        if self._kernel_args is None:
            self._kernel_args = kernel.layer(self.shared.a, self.lora_b, self.member, self.out_features, self.scales)
        h, shrink = self.shared.kernel_shrinks(x, route.pass_id, x.numel() // x.shape[-1] * route.rank)
        kernel.run(self._kernel_args.address, tiles.address, x.data_ptr(), h.data_ptr(), shrink, y.data_ptr(),
                   route.rank, torch.get_num_threads())
        return y

    def slot_views(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A of every member sharing the input, [in, rank * members]; this layer's B, [rank, out]) of a
        slot's first `rank` ranks: views, built on first use (a pass of 210 layers otherwise spent
        ~1,000 indexing calls a step re-making them); B in column blocks is copied each time, and int8
        stacks are float32 copies of their values times their scales."""
        if self.scales is not None:
            return self._dequantized_a(slot, slot + 1, rank)[0], self.b_rows(slot, slot + 1, rank)[0]
        views = self._slot_views.get((slot, rank))
        if views is None:
            if len(self._slot_views) >= VIEWS_KEPT:
                self._slot_views.clear()
            a = self.shared.a[slot, :rank].reshape(rank * self.shared.members, -1)  # [rank * members, in], a view
            b = self.lora_b[slot, :rank] if self.b_blocks is None else None  # blocks: no view of [rank, out]
            views = self._slot_views[(slot, rank)] = (a.T, b)
        a_t, b = views
        return a_t, self.b_rows(slot, slot + 1, rank)[0] if b is None else b

    def span_views(self, start: int, stop: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`slot_views` of the slots [start, stop) at once: [span, in, rank * members] and [span, rank, out]."""
        if self.scales is not None:
            return self._dequantized_a(start, stop, rank), self.b_rows(start, stop, rank)
        views = self._span_views.get((start, stop, rank))
        if views is None:
            if len(self._span_views) >= VIEWS_KEPT:
                self._span_views.clear()
            a = self.shared.a[start:stop, :rank].reshape(stop - start, rank * self.shared.members, -1)  # a view
            b = self.lora_b[start:stop, :rank] if self.b_blocks is None else None  # blocks: no view of [rank, out]
            views = self._span_views[(start, stop, rank)] = (a.transpose(1, 2), b)
        a_t, b = views
        return a_t, self.b_rows(start, stop, rank) if b is None else b

    def b_rows(self, start: int, stop: int, rank: int) -> torch.Tensor:
        """B of the slots [start, stop), their first `rank` ranks, as [span, rank, out]: a view, or a copy of
        column blocks (int8: in float32, times the rows' scales)."""
        if self.b_blocks is None:
            return self.lora_b[start:stop, :rank]
        rows = LoraDelta.unblocked(self.lora_b[start:stop, :, :rank], self.out_features)
        return rows if self.scales is None else rows.float() * self.scales.b[start:stop, :rank, None]

    def _dequantized_a(self, start: int, stop: int, rank: int) -> torch.Tensor:
        """Every member's A of the int8 slots [start, stop), their first `rank` ranks, in float32 times the
        rows' scales, as [span, in, rank * members] (`span_views`)."""
        a_scale = self.shared.a_scale
        assert a_scale is not None
        values = self.shared.a[start:stop, :rank].float() * a_scale[start:stop, :rank, :, None]
        return values.reshape(stop - start, rank * self.shared.members, -1).transpose(1, 2)

    def _b_ranks(self, slot: int, start: int, stop: int) -> torch.Tensor:
        """Ranks [start, stop) of a slot's B, every column (and column block), as a view to write."""
        return self.lora_b[slot, start:stop] if self.b_blocks is None else self.lora_b[slot, :, start:stop]

    def load_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Copy A [rank, in] and B [out, rank] (any float dtype, any device) into a slot, B scaled.

        Returns two float32 values, finite if every weight in the slot is: where the native kernel
        copied them (`LoraDelta.fill`, which checks each weight) zeros or Inf; otherwise the sums of the
        slot's A and B, where one NaN or Inf among the weights makes its sum non-finite, so the caller
        checks every layer's sums at once (`torch.isfinite` per tensor was three times the cost of the
        copies) and `slot_is_finite` only when a sum is not (large finite weights can overflow it).
        """
        kernel = self.routing.kernel
        if kernel is not None and self._fill_target is None:
            self._fill_target = kernel.slot_target(self.lora_a, self.lora_b, self.out_features, self.scales) or False
        rank, written = a.shape[0], self.written_rank[slot]
        if written > rank:  # a narrower adapter than the one before: the rest must add nothing
            self.lora_a[slot, rank:written].zero_()
            self._b_ranks(slot, rank, written).zero_()
        self.written_rank[slot] = rank
        self.filled.add(slot)
        if kernel is not None and self._fill_target:
            not_finite = kernel.fill(self._fill_target, slot, a, b, scale,
                                     self._rounding if self.scales is not None else None)
            if not_finite is not None:
                self.rounding[slot] = self._rounding.value if self.scales is not None else 0.0
                return _NOT_FINITE if not_finite else _FINITE
        device = self.lora_a.device
        # Host file -> device first, arithmetic only on the device. From pinned host memory (CUDA) the
        # copies are queued, not waited for; the caller's finiteness check is the one synchronization.
        a, b = a.to(device, non_blocking=True), b.to(device, non_blocking=True)
        if self.scales is not None:
            return self._quantize_slot(slot, a, b, scale)
        a_slot = self.lora_a[slot, :rank]
        # B into the slot, or for column blocks into a [rank, out] copy first, then into the blocks
        b_slot = self.lora_b[slot, :rank] if self.b_blocks is None else self.lora_b.new_empty(rank, self.out_features)
        a_slot.copy_(a)  # converts to the slot's dtype
        if b.dtype == b_slot.dtype:
            torch.mul(b.T, scale, out=b_slot)  # one pass over B instead of a copy and then a scale
        elif b_slot.dtype.itemsize < 4:  # scaled in float32, rounded once (bfloat16 slots of a float32 file)
            b_slot.copy_(b.T.float() * scale)  # an overflow of the slot's dtype shows as Inf
        else:
            b_slot.copy_(b.T)
            b_slot.mul_(scale)  # in the slot's dtype: an overflow there shows as Inf
        if self.b_blocks is not None:
            self._b_ranks(slot, 0, rank).copy_(self.b_blocks.blocked(b_slot))
        return torch.stack([a_slot.sum(dtype=torch.float32), b_slot.sum(dtype=torch.float32)])

    def _quantize_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """`load_slot` into int8 stacks with torch (what the kernel's fill computes): the sums of the rows'
        scales, which are not finite where a weight is not."""
        assert self.scales is not None and self.b_blocks is not None  # int8 stacks are the kernel's (CPU)
        rank = a.shape[0]
        a_rows, b_rows = a.float(), b.T.float() * scale
        (a_q, a_scale), (b_q, b_scale) = quantize_rows(a_rows), quantize_rows(b_rows)
        self.rounding[slot] = rounding_error(a_rows, b_rows)
        self.lora_a[slot, :rank].copy_(a_q)
        self.scales.a[slot, :rank] = a_scale
        self._b_ranks(slot, 0, rank).copy_(self.b_blocks.blocked(b_q))
        self.scales.b[slot, :rank] = b_scale
        return torch.stack([a_scale.sum(), b_scale.sum()])

    def slot_is_finite(self, slot: int) -> bool:
        """Whether every weight in the slot is finite (exact; sums of large finite weights can overflow;
        column blocks' padding is zero; int8 stacks: their scales)."""
        if self.scales is not None:
            return bool(torch.isfinite(self.scales.a[slot]).all() and torch.isfinite(self.scales.b[slot]).all())
        return bool(torch.isfinite(self.lora_a[slot]).all() and torch.isfinite(self.lora_b[slot]).all())

    def clear_slot(self, slot: int) -> None:
        if slot in self.filled:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            if self.scales is not None:
                self.scales.a[slot].zero_()
                self.scales.b[slot].zero_()
            self.filled.discard(slot)
            self.written_rank[slot] = 0
            self.rounding[slot] = 0.0
