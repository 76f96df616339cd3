"""Token choice for a batch of rows, each with its own sampling parameters (torch, no model)."""

from __future__ import annotations

import math

import torch

from worker.protocol import SamplingParams
from worker.sampling import RowFailure, choose_tokens, make_generator


def params(**over: object) -> SamplingParams:
    return SamplingParams.model_construct(**{**SamplingParams().model_dump(), **over})


def choose(logits: torch.Tensor, rows: list[SamplingParams]) -> list[int | RowFailure]:
    return choose_tokens(logits, rows, [make_generator(p) for p in rows])


def test_greedy_rows_take_the_largest_logit() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert choose(logits, [params(), params()]) == [1, 0]


def test_a_seed_repeats_its_draws_whatever_else_is_in_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    seeded = params(temperature=1.0, seed=42)
    alone = [choose(logits[2:3], [seeded])[0] for _ in range(3)]
    batched = choose(logits, [params(), params(temperature=0.7), seeded, params(temperature=1.3, top_p=0.5)])[2]
    assert alone == [alone[0]] * 3 and batched == alone[0]


def test_draws_follow_the_distribution_and_top_p_cuts_the_tail() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(4000, 3)
    draws = choose(logits, [params(temperature=1.0, seed=i) for i in range(4000)])
    counts = [draws.count(t) / 4000 for t in range(3)]
    assert all(math.isclose(c, p, abs_tol=0.03) for c, p in zip(counts, probs.tolist(), strict=True)), counts
    nucleus = choose(logits[:400], [params(temperature=1.0, top_p=0.85, seed=i) for i in range(400)])
    assert set(nucleus) == {0, 1}  # 0.6 + 0.3 reaches 0.85; 0.1 is cut
    top_only = choose(logits[:50], [params(temperature=1.0, top_p=1e-9, seed=i) for i in range(50)])
    assert set(top_only) == {0}  # the smallest prefix is never empty


def test_a_row_that_cannot_be_sampled_fails_alone() -> None:
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [2.0, 0.0], [1.0, 0.0]])
    rows = [params(temperature=1.0, seed=1), params(), params(temperature=float("nan")), params(temperature=5e-324)]
    chosen = choose(logits, rows)
    assert chosen[0] in (0, 1)
    assert isinstance(chosen[1], RowFailure) and chosen[1].non_finite
    assert chosen[2] == 0  # NaN > 0 is false: greedy, as a caller past validation would get
    assert isinstance(chosen[3], RowFailure) and not chosen[3].non_finite  # logits / 5e-324 overflow
