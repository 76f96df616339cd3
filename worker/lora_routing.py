"""Which adapter slot each token of a forward pass uses, worked out once a pass for every layer.

The engine routes a pass before running it (`LoraRouting.route`); each `MultiLoraLinear`
(`worker.lora`) reads the result: with one adapter in the pass, its slot and tokens; with several,
the few-token slots (decode rows) grouped for two batched matmuls and the many-token slots (prompt
chunks) on their own; and where the native CPU kernel is built (`worker.cpu_lora`), the tokens it
takes, in tiles, leaving torch only the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from worker.cpu_lora import LoraDelta, TokenTiles

BIG_SLOT_TOKENS = 16  # a slot with more tokens than this in a pass (a prompt chunk) gets its own matmuls


@dataclass
class LoraRouting:
    """Which slot each token of the next forward pass uses; set by the engine before it.

    A pass is one flat run of tokens, row after row (the engine's layout), or any [rows, tokens]
    batch read row-major; token indices below count in that order.
    """

    slots: torch.Tensor | None = None  # [tokens] slot of each token; None: no token has an adapter
    active: frozenset[int] = field(default_factory=frozenset)  # slots used in this pass
    rank: int = 0  # widest rank among the active adapters
    single: int | None = None  # the one active slot, when there is exactly one
    single_rows: torch.Tensor | None = None  # [tokens of `single`] token indices, when other tokens have none
    groups: SlotGroups | None = None  # several adapters: few-token slots grouped for two bmm
    big: tuple[tuple[int, torch.Tensor], ...] = ()  # several adapters: (slot, its token indices) for slots with many

    # The native kernel (CPU, float32 or bfloat16 slots; `worker.cpu_lora`), where it works, set before the layers are
    # built (they lay their B stacks out for it): it adds
    # the LoRA of every few-token slot's tokens, and `single`, `groups` and `big` then cover only the rest.
    kernel: LoraDelta | None = None
    kernel_tiles: TokenTiles | None = None  # the tokens the kernel takes, with their slots
    kernel_only: bool = False  # the kernel covers every token with an adapter: torch's paths have nothing to do
    zero_slot: int = -1

    pass_id: int = 0  # changes with every routing: shared shrinks never outlive their pass

    def clear(self) -> None:
        self.slots, self.active, self.rank, self.single, self.single_rows = None, frozenset(), 0, None, None
        self.groups, self.big, self.kernel_tiles, self.kernel_only = None, (), None, False
        self.pass_id += 1

    def route(self, slots: list[int], zero_slot: int, rank_of: Callable[[int], int], device: torch.device,
              lengths: list[int] | None = None) -> None:
        """Set the routing for a pass whose row i has `lengths[i]` tokens (default 1) on `slots[i]`
        (`zero_slot`: the base model)."""
        self.pass_id += 1
        active = frozenset(slot for slot in slots if slot != zero_slot)
        if not active:
            self.clear()
            return
        per_token = slots if lengths is None else [s for s, n in zip(slots, lengths, strict=True) for _ in range(n)]
        self.slots = torch.tensor(per_token, device=device)  # [tokens]
        self.active = active
        self.rank = max(rank_of(slot) for slot in active)
        self.zero_slot = zero_slot
        self.single, self.single_rows, self.groups, self.big = None, None, None, ()
        self.kernel_tiles, self.kernel_only = None, False
        by_slot: dict[int, list[int]] = {}
        for token, slot in enumerate(per_token):
            if slot != zero_slot:
                by_slot.setdefault(slot, []).append(token)
        few = {slot: tokens for slot, tokens in by_slot.items() if len(tokens) <= BIG_SLOT_TOKENS}
        if self.kernel is not None and few:
            self.kernel_tiles = self.kernel.tiles([s if s in few else zero_slot for s in per_token], zero_slot)
            by_slot = {slot: tokens for slot, tokens in by_slot.items() if slot not in few}
            few = {}
            if not by_slot:
                self.kernel_only = True
                return
        if len(by_slot) == 1:
            self.single, tokens = next(iter(by_slot.items()))
            if len(tokens) < len(per_token):
                self.single_rows = torch.tensor(tokens, device=device)  # [tokens with the adapter]
            return
        self.big = tuple((slot, torch.tensor(tokens, device=device)) for slot, tokens in by_slot.items()
                         if len(tokens) > BIG_SLOT_TOKENS)
        self.groups = SlotGroups.of(few, len(per_token), device) if few else None


@dataclass(frozen=True)
class SlotGroups:
    """Tokens with an adapter laid out as [slots in span, tokens per slot]: position g*per_slot + j
    is the j-th token on slot span.start + g, so each group multiplies a view of its own slot's
    weights.

    Nothing is copied out of the slot stacks; only the tokens' activations are gathered (and the
    positions of slots in the span that no token uses hold a zero row whose result is dropped).
    """

    span: slice  # slots [start, stop)
    per_slot: int  # tokens of the busiest slot
    take: torch.Tensor  # [span * per_slot] token at each position; `tokens` (a zero row) where none
    used: torch.Tensor  # [tokens grouped] positions holding a real token
    rows: torch.Tensor  # [tokens grouped] their token indices, in the order of `used`
    dense: bool  # every position holds a real token (every slot in the span has per_slot): no zero row

    @staticmethod
    def of(by_slot: dict[int, list[int]], tokens: int, device: torch.device) -> SlotGroups:
        span = slice(min(by_slot), max(by_slot) + 1)
        per_slot = max(len(rows) for rows in by_slot.values())
        take = [tokens] * ((span.stop - span.start) * per_slot)
        used, rows = [], []
        for slot, slot_rows in by_slot.items():
            for j, row in enumerate(slot_rows):
                position = (slot - span.start) * per_slot + j
                take[position] = row
                used.append(position)
                rows.append(row)
        take_t, used_t, rows_t = (torch.tensor(values, device=device) for values in (take, used, rows))
        return SlotGroups(span, per_slot, take_t, used_t, rows_t, dense=len(used) == len(take))
