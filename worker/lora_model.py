"""The engine's LoRA layers in a model: every adaptable linear wrapped in a `MultiLoraLinear`
(`worker.lora`) in place, siblings that read one input sharing their A stacks (`SharedInput`), and
how many adapter slots a memory budget holds (`ADAPTER_SLOTS_MB`)."""

from __future__ import annotations

import torch
from torch import nn

from worker.cpu_lora import INT8
from worker.lora import MultiLoraLinear, SharedInput
from worker.lora_routing import LoraRouting

# Sibling layers that every supported architecture calls on one and the same input tensor. A wrong
# guess costs speed only: the shrink is shared only when the very same tensor comes in.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def slots_in_budget(linear_modules: dict[str, list[int]], max_rank: int, dtype: torch.dtype, budget_bytes: int,
                    b_chunk: int | None = None) -> int:
    """How many adapter slots fit `budget_bytes`: each holds A [max_rank, in] and B [max_rank, out] on
    every adapted layer (out rounded up to whole column blocks of `b_chunk`, where the layers keep B so;
    int8 with the rows' scales),
    and every layer keeps one more, always zero, for rows without an adapter."""
    def width(out: int) -> int:
        return out if b_chunk is None else -(-out // b_chunk) * b_chunk

    per_slot = max_rank * sum(i + width(o) for i, o in linear_modules.values()) * dtype.itemsize
    if dtype == INT8:  # and a float32 scale for each rank's row of A and of B
        per_slot += max_rank * len(linear_modules) * 2 * 4
    slots = budget_bytes // per_slot - 1
    if slots < 1:
        raise ValueError(f"adapter_slots_mb holds no adapter slot: one needs {2 * per_slot / 2**20:.1f} MiB "
                         f"with the zero slot (max_lora_rank {max_rank}, {len(linear_modules)} layers)")
    return int(slots)


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
    shared: dict[str, tuple[SharedInput, int]] = {}
    for siblings in SHARED_INPUTS:
        for name in linear_modules:
            parent_name, _, child = name.rpartition(".")
            if child != siblings[0]:
                continue
            names = [f"{parent_name}.{s}" if parent_name else s for s in siblings]
            ins = {linear_modules[n][0] for n in names if n in linear_modules}
            present = [n for n in names if n in linear_modules]
            if len(present) > 1 and len(ins) == 1:
                group = SharedInput(len(present), num_slots, max_rank, ins.pop(), device, dtype)
                shared.update({n: (group, member) for member, n in enumerate(present)})
    for name, (in_features, out_features) in linear_modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = MultiLoraLinear(
            getattr(parent, child), in_features, out_features, num_slots, max_rank, routing, device, dtype,
            shared.get(name),
        )
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    return layers
