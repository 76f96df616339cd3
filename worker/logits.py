"""Per-row logits processing before a token is chosen: OpenAI's presence and frequency penalties
and logit_bias, min_tokens, and response_format masks.

Only the rows that ask for something pay for it, and everything is batched on the logits'
device: a batch where no row asks does nothing at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from worker.grammar import Grammars
from worker.sequence import Sequence

Adjust = Callable[[torch.Tensor], torch.Tensor]


def processing(rows: list[Sequence], eos_ids: set[int], grammars: Grammars, vocab: int,
               device: torch.device) -> tuple[Adjust | None, dict[int, str]]:
    """The processing of logits [rows, vocab] for this step, or None; and rows whose grammar
    failed, by index, with why (their logits are left alone: the caller fails them)."""
    params = [seq.request.sampling for seq in rows]
    penalized = [i for i, p in enumerate(params) if (p.presence_penalty or p.frequency_penalty) and rows[i].output_ids]
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    # Before min_tokens, neither EOS nor a stop token may come (ignore_eos rows never stop on EOS anyway).
    early = [i for i, p in enumerate(params) if len(rows[i].output_ids) < p.min_tokens]
    constrained = [i for i, seq in enumerate(rows) if seq.matcher is not None]
    failed: dict[int, str] = {}
    mask = None
    if constrained:
        mask, errors = grammars.allowed([rows[i].matcher for i in constrained], vocab, device)
        failed = {i: error for i, error in zip(constrained, errors, strict=True) if error}
    if not (penalized or biased or early or constrained):
        return None, failed

    def index(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([r for r, _ in pairs], device=device), torch.tensor([t for _, t in pairs], device=device)

    def adjust(logits: torch.Tensor) -> torch.Tensor:
        if penalized:
            rows_at, tokens_at = index([(k, t) for k, i in enumerate(penalized) for t in rows[i].output_ids])
            counts = torch.zeros(len(penalized), logits.shape[1], device=device)
            counts.index_put_((rows_at, tokens_at), torch.ones_like(tokens_at, dtype=counts.dtype), accumulate=True)
            frequency = torch.tensor([params[i].frequency_penalty for i in penalized], device=device).unsqueeze(1)
            presence = torch.tensor([params[i].presence_penalty for i in penalized], device=device).unsqueeze(1)
            at = torch.tensor(penalized, device=device)
            logits.index_copy_(0, at, logits.index_select(0, at) - frequency * counts - presence * (counts > 0))
        if biased:
            pairs = [(i, t) for i in biased for t in params[i].logit_bias]
            bias = torch.tensor([params[i].logit_bias[t] for i, t in pairs], device=device, dtype=logits.dtype)
            logits.index_put_(index(pairs), bias, accumulate=True)
        if early:
            pairs = [(i, t) for i in early for t in {*eos_ids, *params[i].stop_token_ids} if t < logits.shape[1]]
            if pairs:
                logits.index_put_(index(pairs), torch.tensor(float("-inf"), device=device))
        if mask is not None:
            at = torch.tensor(constrained, device=device)
            logits.index_copy_(0, at, logits.index_select(0, at).masked_fill(~mask, float("-inf")))
        return logits

    return adjust, failed
