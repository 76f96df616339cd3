"""The model runner: one forward pass over a planned run of tokens.

It turns the scheduler's plan (each row with how many tokens it feeds this step) into one flat
pass: the tokens and their positions, each row's segment of its KV region (`worker.kvcache`),
the LoRA slot of every token (`worker.lora`), and the logits of the rows whose next token is
due. It owns the KV pool; it knows nothing of tenants, queues or text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker.adapter_cache import AdapterCache
from worker.kvcache import KVPool, PassPlan, Segment, use_row_attention
from worker.lora import LoraRouting
from worker.sequence import Sequence


@dataclass
class PassResult:
    due: list[Sequence]  # rows that get their next token from this pass, in the order of `logits`
    logits: torch.Tensor  # [len(due), vocab]
    prompt_tokens: int  # prompt tokens this pass prefilled


class ModelRunner:
    def __init__(
        self, model: Any, adapters: AdapterCache, routing: LoraRouting, kv_positions: int, device: torch.device
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.routing = routing
        self.device = device
        use_row_attention(model)
        kv_dtype = model.get_input_embeddings().weight.dtype  # the dtype attention computes in
        self.kv = KVPool(model.config, kv_positions, kv_dtype, device)

    def run(self, plan: list[tuple[Sequence, int]]) -> PassResult:
        """Feed every (row, tokens) of the plan; the rows' caches advance by what they fed."""
        ids: list[int] = []
        positions: list[int] = []
        segments: list[Segment] = []
        due: list[Sequence] = []
        last: list[int] = []  # index in the pass of each due row's last token
        forks: list[tuple[Sequence, Sequence]] = []  # (choice 0, a sibling that takes a copy of its prompt)
        for seq, tokens in plan:
            assert seq.region is not None, "a planned row holds a KV region"
            segments.append(Segment(len(ids), tokens, seq.region, seq.cached))
            if seq.prefilled:
                ids.append(seq.output_ids[-1])
            else:
                ids.extend(seq.prompt_ids[seq.cached : seq.cached + tokens])
            positions.extend(range(seq.cached, seq.cached + tokens))
            if seq.prefilled or seq.cached + tokens == len(seq.prompt_ids):
                due.append(seq)
                last.append(len(ids) - 1)
                if not seq.prefilled:  # its prompt completes: n > 1 choices fork from its last logits
                    for sibling in seq.siblings:
                        if sibling.finish_reason is None:
                            forks.append((seq, sibling))
                            due.append(sibling)
                            last.append(len(ids) - 1)
        prompt_tokens = sum(tokens for seq, tokens in plan if not seq.prefilled)
        zero = self.adapters.zero_slot
        slots = [zero if seq.slot is None else seq.slot for seq, _ in plan]
        self.routing.route(slots, zero, self.adapters.rank_of, self.device, [tokens for _, tokens in plan])
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            use_cache=False,
            logits_to_keep=torch.tensor(last, dtype=torch.long, device=self.device) if last else 1,
            kv_plan=PassPlan.build(self.kv, segments, self.device),
        )
        for seq, tokens in plan:
            seq.cached += tokens
        for first, sibling in forks:
            assert first.region is not None and sibling.region is not None
            self.kv.copy(first.region, sibling.region, len(first.prompt_ids))
            sibling.cached = len(first.prompt_ids)
        return PassResult(due, out.logits[0] if due else out.logits[0, :0], prompt_tokens)
