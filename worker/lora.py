"""LoRA applied by the engine's own layer, a different adapter on every row.

Each adapted linear layer keeps all resident adapters stacked in slot tensors and adds
`B[slot] · (A[slot] · x)` per row with one gather and two batched matmuls on top of
whatever the base layer is (bitsandbytes NF4, GPTQ/AWQ or plain). Adapter weights are
copied into the slot tensors from their own files: the base module is never read or
written, so bitsandbytes' CPU repacking bug (DESIGN.md) cannot touch it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoraRouting:
    """Which slot each row of the next forward pass uses; set by the engine before it."""

    slots: torch.Tensor | None = None  # [batch] slot of each row; None: no row has an adapter
    active: frozenset[int] = field(default_factory=frozenset)  # slots used in this pass
    rank: int = 0  # widest rank among the active adapters

    def clear(self) -> None:
        self.slots, self.active, self.rank = None, frozenset(), 0


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
        self.lora_b = torch.zeros(num_slots + 1, out_features, max_rank, device=device, dtype=dtype)
        self.filled: set[int] = set()  # slots holding weights for this layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = self.routing
        if route.slots is None or self.filled.isdisjoint(route.active):
            return y
        a = self.lora_a[route.slots, : route.rank]  # [batch, rank, in]
        b = self.lora_b[route.slots, :, : route.rank]  # [batch, out, rank]
        h = torch.bmm(x.to(a.dtype), a.transpose(1, 2))  # [batch, tokens, rank]
        return y + torch.bmm(h, b.transpose(1, 2)).to(y.dtype)  # [batch, tokens, out]

    def load_slot(self, slot: int, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        rank = a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :rank].copy_(a)
        self.lora_b[slot, :, :rank].copy_(b_scaled)
        self.filled.add(slot)

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
