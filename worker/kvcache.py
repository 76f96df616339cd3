"""The engine's KV cache: one preallocated pool, each running row in a contiguous region of it.

Every forward pass is one flat sequence of tokens (decode rows, one token each, and chunks of
prompts being prefilled). The model's attention layers call `rows_attention`, registered with
transformers' attention interface: it writes the new keys and values into the rows' regions and
attends each row over a view of its own region, so

- a decode step costs the attention over each row's real length, no padding and no copy of
  the cache (the old cache grew by `torch.cat` at every step and was copied whole when a row
  joined or left);
- admitting or retiring a row touches no other row's memory (`worker.scheduler.RegionAllocator`
  hands out the regions);
- a prompt can be prefilled in chunks between decode steps: a chunk attends to the keys already
  in its region and, causally, to itself.

Regions rather than paged blocks: with no paged-attention kernel on CPU, blocks would have to be
gathered into one tensor per row, per layer, per step, a copy as large as the attention's own
reads. A region is read in place. The price is that a row reserves its prompt plus max_tokens at
admission (no growth, so no preemption either) and that free memory can be fragmented; a row
that finds no region large enough waits for one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from worker.cpu_attention import KV_DTYPES, DecodeAttention, DecodeRows

ATTENTION = "loraplex_rows"


@dataclass(frozen=True)
class Segment:
    """One row's tokens in a forward pass."""

    first: int  # index of its first token in the flat pass
    tokens: int  # how many (1 for a decode row)
    region: int  # start of its KV region in the pool
    past: int  # positions of this row already in the cache before this pass

    @property
    def length(self) -> int:
        return self.past + self.tokens


class KVPool:
    """Keys and values of all layers, [kv_heads, positions, head_dim] each, allocated once.

    They are stored in `dtype` and attended in `compute` (the model's dtype; default `dtype`): a
    bfloat16 pool under a float32 model (`KV_CACHE_DTYPE=bfloat16` on the CPU) holds twice the
    positions and a decode step reads half the bytes; each key and value is rounded once, as it is
    written, and every read (the decode kernel's, torch's for prompt chunks) widens the same stored value.
    """

    def __init__(
        self, config: Any, positions: int, dtype: torch.dtype, device: torch.device,
        decode_kernel: DecodeAttention | None = None, compute: torch.dtype | None = None,
    ) -> None:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        shape = (kv_heads, positions, head_dim)
        # torch.empty: on CPU the pages are only touched as rows write them.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.positions = positions
        self.dtype = dtype
        self.compute = compute or dtype
        # Attends all decode rows of a layer in one call (worker.cpu_attention): float32 or bfloat16
        # CPU pools under a float32 model.
        usable = dtype in KV_DTYPES and self.compute == torch.float32 and device.type == "cpu"
        self.decode_kernel = decode_kernel if usable else None

    def copy(self, source: int, target: int, length: int) -> None:
        """Copy `length` positions of every layer from one region to another (a prompt shared by n choices)."""
        for cache in (*self.keys, *self.values):
            cache[:, target : target + length] = cache[:, source : source + length]


@dataclass
class PassPlan:
    """What `rows_attention` needs for one forward pass; passed to the model as `kv_plan`."""

    pool: KVPool
    segments: list[Segment]
    slots: torch.Tensor  # [tokens] pool position each new token's key and value go to
    masks: dict[int, torch.Tensor]  # segment index -> [tokens, length] bool, for chunks after the first
    decode: DecodeRows | None = None  # the one-token segments, when the pool's kernel attends them
    others: list[int] | None = None  # indices of the segments left to torch's attention (None: all)

    @staticmethod
    def build(pool: KVPool, segments: list[Segment], device: torch.device) -> PassPlan:
        slots = torch.cat([
            torch.arange(s.region + s.past, s.region + s.length, device=device) for s in segments
        ])
        masks = {}
        for i, s in enumerate(segments):
            if s.tokens > 1 and s.past > 0:  # a later chunk: all of the past, causal within itself
                query_at = torch.arange(s.past, s.length, device=device).unsqueeze(1)
                masks[i] = torch.arange(s.length, device=device).unsqueeze(0) <= query_at
        if pool.decode_kernel is None or not any(s.tokens == 1 for s in segments):
            return PassPlan(pool, segments, slots, masks)
        one = [s for s in segments if s.tokens == 1]
        decode = DecodeRows.of([s.first for s in one], [s.region for s in one], [s.length for s in one])
        others = [i for i, s in enumerate(segments) if s.tokens > 1]
        return PassPlan(pool, segments, slots, masks, decode, others)


def rows_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, heads, tokens, head_dim]
    key: torch.Tensor,  # [1, kv_heads, tokens, head_dim], the new tokens only
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    plan: PassPlan | None = kwargs.get("kv_plan")
    if plan is None:
        raise RuntimeError("this model's attention runs only inside the engine (no kv_plan given)")
    layer: int = module.layer_idx  # type: ignore[assignment]
    keys, values = plan.pool.keys[layer], plan.pool.values[layer]
    keys.index_copy_(1, plan.slots, key[0].to(plan.pool.dtype))
    values.index_copy_(1, plan.slots, value[0].to(plan.pool.dtype))
    query = query.to(plan.pool.compute)
    out = query.new_empty(query.shape[2], query.shape[1], query.shape[3])  # [tokens, heads, head_dim]
    if plan.decode is not None:
        assert plan.pool.decode_kernel is not None
        scale = scaling if scaling is not None else query.shape[3] ** -0.5
        plan.pool.decode_kernel.attend(query[0], keys, values, plan.decode, scale, out)
    for i in range(len(plan.segments)) if plan.others is None else plan.others:
        s = plan.segments[i]
        q = query[:, :, s.first : s.first + s.tokens]
        # the stored values, widened where the pool is narrower than the model (a copy of the row's region)
        k = keys[:, s.region : s.region + s.length].unsqueeze(0).to(query.dtype)
        v = values[:, s.region : s.region + s.length].unsqueeze(0).to(query.dtype)
        mask = plan.masks.get(i)
        causal = s.tokens > 1 and mask is None  # a whole prompt or a first chunk: plain causal
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling,
                                           enable_gqa=True)
        out[s.first : s.first + s.tokens] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def use_row_attention(model: Any) -> None:
    """Make the model's attention layers read and write the engine's pool (see the module doc)."""
    config = model.config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise ValueError("models with sliding-window attention are not supported by the engine's KV cache")
    AttentionInterface.register(ATTENTION, rows_attention)
    model.set_attn_implementation(ATTENTION)
