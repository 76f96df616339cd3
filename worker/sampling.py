"""Per-row token choice: greedy, or temperature + nucleus sampling with a per-row seed.

A row whose logits are not finite, or whose sampling fails, gets a `RowFailure` instead of
a token: it fails alone, and the other rows of the batch go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.protocol import SamplingParams


@dataclass(frozen=True)
class RowFailure:
    message: str
    status: int
    non_finite: bool = False  # the row's logits held NaN or Inf


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    generator = torch.Generator(device="cpu")
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def choose_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int | RowFailure]:
    """logits: [batch, vocab] for the last position of each row."""
    logits = logits.float().cpu()
    finite = torch.isfinite(logits).all(dim=-1).tolist()  # [batch]
    chosen: list[int | RowFailure] = list(logits.argmax(dim=-1).tolist())
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not finite[row]:
            chosen[row] = RowFailure("non-finite values", 500, non_finite=True)
        elif p.temperature > 0:
            chosen[row] = _sample_row(logits[row], p, generator)
    return chosen


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int | RowFailure:
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        sorted_probs[cumulative - sorted_probs > p.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    try:
        return int(torch.multinomial(probs, 1, generator=generator).item())
    except RuntimeError as exc:  # probabilities torch refuses (inf, nan, all zero): this row only
        return RowFailure(f"sampling failed: {exc}", 500)
