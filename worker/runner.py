"""The model runner: one forward pass over a planned run of tokens.

It turns the scheduler's plan (each row with how many tokens it feeds this step) into one flat
pass: the tokens and their positions, each row's segment of its KV region (`worker.kvcache`),
the LoRA slot of every token (`worker.lora`), and the logits of the rows whose next token is
due. It owns the KV pool; it knows nothing of tenants, queues or text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from worker.adapter_cache import AdapterCache
from worker.cpu_attention import decode_attention_kernel
from worker.kvcache import KVPool, PassPlan, Segment, use_row_attention
from worker.lora_routing import LoraRouting
from worker.sequence import Sequence


@dataclass
class PromptScores:
    """Logits at a prompt chunk's positions, for the prompt's own log probabilities (echo)."""

    seq: Sequence
    logits: torch.Tensor  # [len(targets), vocab]: row i is the distribution of `targets[i]`
    targets: list[int]  # the prompt tokens that followed


@dataclass
class PassResult:
    due: list[Sequence]  # rows that get their next token from this pass, in the order of `logits`
    logits: torch.Tensor  # [len(due), vocab]
    prompt_tokens: int  # prompt tokens this pass prefilled
    scores: list[PromptScores] = field(default_factory=list)  # rows that asked for their prompt's log probabilities


class ModelRunner:
    def __init__(
        self, model: Any, adapters: AdapterCache, routing: LoraRouting, kv_positions: int, device: torch.device,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.routing = routing
        self.device = device
        use_row_attention(model)
        compute = model.get_input_embeddings().weight.dtype  # the dtype attention computes in
        kv_dtype = kv_dtype or compute  # the dtype the pool stores (`KV_CACHE_DTYPE`)
        kernel = decode_attention_kernel() if device.type == "cpu" and compute == torch.float32 else None
        self.kv = KVPool(model.config, kv_positions, kv_dtype, device, kernel, compute)

    def run(self, plan: list[tuple[Sequence, int]]) -> PassResult:
        """Feed every (row, tokens) of the plan; the rows' caches advance by what they fed."""
        flat = _FlatPass()
        for seq, tokens in plan:
            flat.add(seq, tokens)
        prompt_tokens = sum(tokens for seq, tokens in plan if not seq.prefilled)
        zero = self.adapters.zero_slot
        slots = [zero if seq.slot is None else seq.slot for seq, _ in plan]
        self.routing.route(slots, zero, self.adapters.rank_of, self.device, [tokens for _, tokens in plan])
        keep = flat.last + [i for _, first, count in flat.scored for i in range(first, first + count)]
        out = self.model(
            input_ids=torch.tensor([flat.ids], device=self.device),
            position_ids=torch.tensor([flat.positions], device=self.device),
            use_cache=False,
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=self.device) if keep else 1,
            kv_plan=PassPlan.build(self.kv, flat.segments, self.device),
        )
        scores, at = [], len(flat.last)
        for seq, _, count in flat.scored:
            targets = seq.prompt_ids[seq.cached + 1 : seq.cached + 1 + count]
            scores.append(PromptScores(seq, out.logits[0, at : at + count], targets))
            at += count
        for seq, tokens in plan:
            seq.cached += tokens
        for first, sibling in flat.forks:
            assert first.region is not None and sibling.region is not None
            self.kv.copy(first.region, sibling.region, len(first.prompt_ids))
            sibling.cached = len(first.prompt_ids)
        return PassResult(flat.due, out.logits[0, : len(flat.last)], prompt_tokens, scores)


@dataclass
class _FlatPass:
    """The plan laid out as one run of tokens, and which of its positions' logits are wanted."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    due: list[Sequence] = field(default_factory=list)
    last: list[int] = field(default_factory=list)  # index in the pass of each due row's last token
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)  # (choice 0, a sibling taking its prompt)
    scored: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (row, first index, positions) to score

    def add(self, seq: Sequence, tokens: int) -> None:
        assert seq.region is not None, "a planned row holds a KV region"
        self.segments.append(Segment(len(self.ids), tokens, seq.region, seq.cached))
        if seq.prefilled:
            self.ids.append(seq.output_ids[-1])
        else:
            self.ids.extend(seq.prompt_ids[seq.cached : seq.cached + tokens])
        self.positions.extend(range(seq.cached, seq.cached + tokens))
        if seq.scores_prompt and not seq.prefilled:
            # Position p's logits score prompt token p + 1; the last prompt position's are the due row's.
            count = min(seq.cached + tokens, len(seq.prompt_ids) - 1) - seq.cached
            if count > 0:
                self.scored.append((seq, len(self.ids) - tokens, count))
        if seq.prefilled or seq.cached + tokens == len(seq.prompt_ids):
            self.due.append(seq)
            self.last.append(len(self.ids) - 1)
            if not seq.prefilled:  # its prompt completes: n > 1 choices fork from its last logits
                for sibling in seq.siblings:
                    if sibling.finish_reason is None:
                        self.forks.append((seq, sibling))
                        self.due.append(sibling)
                        self.last.append(len(self.ids) - 1)
