"""LoRA applied by the engine's own layer, a different adapter on every row.

Each adapted linear layer keeps all resident adapters stacked in slot tensors and adds
`B[slot] · (A[slot] · x)` per row on top of whatever the base layer is (bitsandbytes
NF4, GPTQ/AWQ or plain): with one adapter in the batch, two plain matmuls on views of
its slot; with several, one `index_select` per matrix and two batched matmuls. (On CPU,
index_select + bmm with B stored transposed measured 3x faster than advanced indexing.) Adapter weights are
copied into the slot tensors from their own files: the base module is never read or
written, so bitsandbytes' CPU repacking bug (docs/architecture.md) cannot touch it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoraRouting:
    """Which slot each row of the next forward pass uses; set by the engine before it."""

    slots: torch.Tensor | None = None  # [batch] slot of each row; None: no row has an adapter
    active: frozenset[int] = field(default_factory=frozenset)  # slots used in this pass
    rank: int = 0  # widest rank among the active adapters
    single: int | None = None  # the one active slot, when there is exactly one
    single_rows: torch.Tensor | None = None  # [rows of `single`] batch indices, when other rows have none
    groups: SlotGroups | None = None  # several adapters: rows grouped by slot

    def clear(self) -> None:
        self.slots, self.active, self.rank, self.single, self.single_rows = None, frozenset(), 0, None, None
        self.groups = None

    def route(self, slots: list[int], zero_slot: int, rank_of: Callable[[int], int], device: torch.device) -> None:
        """Set the routing for a batch whose row i uses `slots[i]` (`zero_slot`: the base model)."""
        active = frozenset(slot for slot in slots if slot != zero_slot)
        if not active:
            self.clear()
            return
        self.slots = torch.tensor(slots, device=device)  # [batch]
        self.active = active
        self.rank = max(rank_of(slot) for slot in active)
        self.single = next(iter(active)) if len(active) == 1 else None
        self.single_rows = None
        self.groups = None
        if self.single is not None and zero_slot in slots:
            self.single_rows = (self.slots != zero_slot).nonzero().view(-1)  # [rows with the adapter]
        elif self.single is None:
            self.groups = SlotGroups.of(slots, zero_slot, device)


@dataclass(frozen=True)
class SlotGroups:
    """Rows with an adapter laid out as [slots in span, rows per slot]: position g*per_slot + j is
    the j-th row on slot span.start + g, so each group multiplies a view of its own slot's weights.

    Nothing is copied out of the slot stacks; only the rows' activations are gathered (and the
    positions of slots in the span that no row uses hold a zero row whose result is dropped).
    """

    span: slice  # slots [start, stop)
    per_slot: int  # rows of the busiest slot
    take: torch.Tensor  # [span * per_slot] batch row at each position; `batch` (a zero row) where none
    used: torch.Tensor  # [rows with an adapter] positions holding a real row
    rows: torch.Tensor  # [rows with an adapter] their batch rows, in the order of `used`

    @staticmethod
    def of(slots: list[int], zero_slot: int, device: torch.device) -> SlotGroups:
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot != zero_slot:
                by_slot.setdefault(slot, []).append(row)
        span = slice(min(by_slot), max(by_slot) + 1)
        per_slot = max(len(rows) for rows in by_slot.values())
        take = [len(slots)] * ((span.stop - span.start) * per_slot)
        used, rows = [], []
        for slot, slot_rows in by_slot.items():
            for j, row in enumerate(slot_rows):
                position = (slot - span.start) * per_slot + j
                take[position] = row
                used.append(position)
                rows.append(row)
        take_t, used_t, rows_t = (torch.tensor(values, device=device) for values in (take, used, rows))
        return SlotGroups(span, per_slot, take_t, used_t, rows_t)


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
    ) -> None:
        super().__init__()
        self.base = base
        self.routing = routing
        # The extra last slot stays zero: rows without an adapter point at it.
        self.lora_a = torch.zeros(num_slots + 1, max_rank, in_features, device=device, dtype=dtype)
        self.lora_b = torch.zeros(num_slots + 1, max_rank, out_features, device=device, dtype=dtype)  # B transposed
        self.filled: set[int] = set()  # slots holding weights for this layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = self.routing
        if route.slots is None or self.filled.isdisjoint(route.active):
            return y
        rank = route.rank
        if x.dtype != self.lora_a.dtype:
            x = x.to(self.lora_a.dtype)
        if route.single is not None:
            rows = route.single_rows
            if rows is not None:
                # Only the adapter's rows are computed and added: base rows keep the base layer's
                # exact values whatever the adapter holds (masking by x 0 turned its inf into NaN there).
                x = x.index_select(0, rows)
            h = x @ self.lora_a[route.single, :rank].T  # [rows, tokens, rank]
            delta = h @ self.lora_b[route.single, :rank]  # [rows, tokens, out]
            if rows is not None:
                return y.index_add(0, rows, delta.to(y.dtype))
        else:
            groups = route.groups
            assert groups is not None
            tokens = x.shape[1]
            padded = torch.cat([x, x.new_zeros(1, tokens, x.shape[2])])  # row `batch`: zeros
            xs = padded.index_select(0, groups.take)  # [span * per_slot, tokens, in]
            xs = xs.view(-1, groups.per_slot * tokens, x.shape[2])  # [span, per_slot * tokens, in]
            a = self.lora_a[groups.span, :rank]  # [span, rank, in], a view
            b = self.lora_b[groups.span, :rank]  # [span, rank, out], a view
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b)  # [span, per_slot * tokens, out]
            delta = delta.view(-1, tokens, delta.shape[2]).index_select(0, groups.used)  # [rows, tokens, out]
            return y.index_add(0, groups.rows, delta.to(y.dtype))
        return y + delta.to(y.dtype)

    def load_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> bool:
        """Copy A [rank, in] and B [out, rank] (any float dtype, any device) into a slot, B scaled.

        False when a value is not finite in the slot's dtype (the caller refuses the adapter).
        """
        rank = a.shape[0]
        self.lora_a[slot, rank:].zero_()  # a narrower adapter than the slot: the rest adds nothing
        self.lora_b[slot, rank:].zero_()
        self.lora_a[slot, :rank].copy_(a)  # copy_ converts dtype and crosses devices (host file -> GPU)
        b_slot = self.lora_b[slot, :rank]
        b_slot.copy_(b.T)
        b_slot.mul_(scale)
        self.filled.add(slot)
        return bool(torch.isfinite(self.lora_a[slot, :rank]).all() and torch.isfinite(b_slot).all())

    def clear_slot(self, slot: int) -> None:
        if slot in self.filled:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            self.filled.discard(slot)


def install_lora_layers(
    model: nn.Module,
    linear_modules: dict[str, list[int]],
    num_slots: int,
    max_rank: int,
    routing: LoraRouting,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, MultiLoraLinear]:
    """Wrap every adaptable linear layer in place; return them by module name."""
    layers: dict[str, MultiLoraLinear] = {}
    for name, (in_features, out_features) in linear_modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = MultiLoraLinear(
            getattr(parent, child), in_features, out_features, num_slots, max_rank, routing, device, dtype
        )
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    return layers
