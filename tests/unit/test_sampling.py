"""Token choice for a batch of rows, each with its own sampling parameters (torch, no model)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from worker.grammar import Grammars
from worker.logits import processing
from worker.protocol import GenerateRequest, SamplingParams
from worker.sampling import RowFailure, choose_tokens, make_generator
from worker.sequence import Sequence


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


def sorted_nucleus_draw(logits: torch.Tensor, p: SamplingParams) -> int:
    """The textbook nucleus draw: sort the whole vocabulary, keep the smallest prefix reaching top_p,
    invert the CDF at the row's own uniform number."""
    generator = make_generator(p)
    uniform = float(torch.rand(1, generator=generator).item())
    probs, order = torch.softmax(logits / p.temperature, dim=-1).sort(descending=True)
    cumulative = probs.cumsum(0)
    kept = probs.masked_fill(cumulative - probs > p.top_p, 0.0)
    cdf = kept.cumsum(0)
    return int(order[int(torch.searchsorted(cdf, uniform * cdf[-1:]))])


def test_a_nucleus_inside_the_likeliest_tokens_or_wider_draws_what_sorting_everything_draws() -> None:
    """The likeliest NUCLEUS_CANDIDATES answer a peaked row; a flat row's nucleus (thousands of
    tokens) needs the whole vocabulary; both, and a top_p 1 row beside them, draw as they would alone."""
    generator = torch.Generator().manual_seed(3)
    vocab = 8000
    peaked = torch.randn(vocab, generator=generator) * 4
    flat = torch.randn(vocab, generator=generator) * 0.05
    rows = [(peaked, params(temperature=0.8, top_p=0.9, seed=i)) for i in range(20)]
    rows += [(flat, params(temperature=1.0, top_p=0.9, seed=100 + i)) for i in range(20)]
    rows += [(flat, params(temperature=1.0, seed=7))]
    logits = torch.stack([row for row, _ in rows])
    chosen = choose(logits, [p for _, p in rows])
    for i, (row, p) in enumerate(rows[:-1]):
        assert chosen[i] == sorted_nucleus_draw(row, p), i
    assert max(chosen[20:40]) > 0 and len(set(chosen[20:40])) > 15  # the flat rows range over the vocabulary
    assert chosen[-1] == choose(flat.unsqueeze(0), [rows[-1][1]])[0]


def test_a_row_that_cannot_be_sampled_fails_alone() -> None:
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [2.0, 0.0], [1.0, 0.0]])
    rows = [params(temperature=1.0, seed=1), params(), params(temperature=float("nan")), params(temperature=5e-324)]
    chosen = choose(logits, rows)
    assert chosen[0] in (0, 1)
    assert isinstance(chosen[1], RowFailure) and chosen[1].non_finite
    assert chosen[2] == 0  # NaN > 0 is false: greedy, as a caller past validation would get
    assert isinstance(chosen[3], RowFailure) and not chosen[3].non_finite  # logits / 5e-324 overflow


def mask_rows(rows: list[int], allowed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def adjust(logits: torch.Tensor) -> torch.Tensor:
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
        return logits
    return adjust


def test_masked_rows_take_only_allowed_tokens_and_the_others_are_untouched() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    logits[:, 7] = 100.0  # everyone's favourite
    allowed = torch.zeros(2, 50, dtype=torch.bool)
    allowed[0, [3, 4]] = True
    allowed[1, 9] = True
    rows = [params(), params(temperature=1.5, seed=5), params()]
    free = choose(logits.clone(), rows)
    chosen = choose_tokens(logits.clone(), rows, [make_generator(p) for p in rows], mask_rows([0, 1], allowed))
    assert chosen[0] == int(logits[0, [3, 4]].argmax()) + 3
    assert chosen[1] == 9  # sampled, yet only the one allowed token
    assert chosen[2] == free[2] == 7


def test_masking_is_not_taken_for_non_finite_logits_but_a_masked_nan_still_is() -> None:
    logits = torch.zeros(2, 10)
    logits[0, 2] = math.nan
    allowed = torch.zeros(2, 10, dtype=torch.bool)
    allowed[:, 5] = True  # the mask writes -inf everywhere else
    chosen = choose_tokens(logits, [params(), params()], [None, None], mask_rows([0, 1], allowed))
    assert isinstance(chosen[0], RowFailure) and chosen[0].non_finite
    assert chosen[1] == 5


def sequence(output: list[int], **over: object) -> Sequence:
    request = GenerateRequest(request_id=f"r{len(output)}{sorted(over)}", prompt="x",
                              sampling=SamplingParams(max_tokens=50, **over))  # type: ignore[arg-type]
    return Sequence(request=request, sink=lambda event: None, prompt_ids=[1], output_ids=list(output))


def processed(rows: list[Sequence], logits: torch.Tensor, eos: set[int] | None = None) -> torch.Tensor:
    adjust, failed = processing(rows, eos or {0}, Grammars(None), logits.shape[1], logits.device)
    assert adjust is not None and not failed
    return adjust(logits.clone())


def test_penalties_count_only_the_rows_own_generated_tokens() -> None:
    rows = [sequence([5, 5, 6], presence_penalty=1.0, frequency_penalty=0.5), sequence([5, 5, 6]),
            sequence([], presence_penalty=2.0)]
    out = processed(rows, torch.zeros(3, 10))
    assert out[0, 5] == -2.0 and out[0, 6] == -1.5 and out[0, [0, 1, 2, 3, 4, 7, 8, 9]].eq(0).all()
    assert out[1:].eq(0).all()  # no penalty asked, or nothing generated yet


def test_negative_penalties_favour_repeats_and_logit_bias_adds_per_token() -> None:
    rows = [sequence([3], frequency_penalty=-2.0), sequence([], logit_bias={7: 100.0, 2: -100.0})]
    out = processed(rows, torch.ones(2, 10))
    assert out[0, 3] == 3.0
    assert out[1, 7] == 101.0 and out[1, 2] == -99.0
    assert choose_tokens(torch.ones(2, 10), [r.request.sampling for r in rows], [None, None],
                         processing(rows, {0}, Grammars(None), 10, torch.device("cpu"))[0]) == [3, 7]


def test_before_min_tokens_neither_eos_nor_a_stop_token_can_come() -> None:
    rows = [sequence([4], min_tokens=3, stop_token_ids=[8]), sequence([4, 4, 4], min_tokens=3, stop_token_ids=[8])]
    logits = torch.zeros(2, 10)
    logits[:, 0] = logits[:, 8] = 50.0
    out = processed(rows, logits, eos={0, 9})
    assert out[0, [0, 8, 9]].eq(float("-inf")).all() and out[0, 1:8].eq(0).all()
    assert out[1].equal(logits[1])  # min_tokens reached


def test_a_row_left_with_no_possible_token_fails_alone_with_a_422() -> None:
    rows = [sequence([], min_tokens=2), sequence([])]
    adjust, _ = processing(rows, {0, 1}, Grammars(None), 2, torch.device("cpu"))
    chosen = choose_tokens(torch.zeros(2, 2), [r.request.sampling for r in rows], [None, None], adjust)
    assert isinstance(chosen[0], RowFailure) and chosen[0].status == 422 and "min_tokens" in chosen[0].message
    assert chosen[1] == 0


def test_no_processing_when_no_row_asks_for_any() -> None:
    assert processing([sequence([1, 2]), sequence([])], {0}, Grammars(None), 10, torch.device("cpu")) == (None, {})
