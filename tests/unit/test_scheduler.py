"""The engine's admission order between tenants and its KV regions (worker.scheduler, no torch, no model)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from worker.scheduler import FairQueue, RegionAllocator, plan_pass


@dataclass(eq=False)
class Req:
    tenant: str
    name: str
    prompt: int = 10


@dataclass(eq=False)
class Running:
    prompt: int
    cached: int = 0
    finish_reason: str | None = None
    follower: bool = False  # a later choice of an n > 1 request
    scored: bool = False  # its prompt's log probabilities were asked

    @property
    def prompt_ids(self) -> list[int]:
        return list(range(self.prompt))

    @property
    def prefilled(self) -> bool:
        return self.cached >= self.prompt

    @property
    def follows(self) -> bool:
        return self.follower and not self.prefilled

    @property
    def scores_prompt(self) -> bool:
        return self.scored


def feed(plan: list[tuple[Running, int]]) -> None:
    for row, tokens in plan:
        row.cached += tokens


def admit(queue: FairQueue[Req], generated: int = 20) -> Req:
    """Admit the head and charge it as the engine does: its prompt, then its tokens."""
    head = queue.head()
    assert head is not None
    queue.remove(head)
    queue.charge(head.tenant, head.prompt + generated)
    return head


def test_one_tenant_alone_is_served_oldest_first() -> None:
    queue: FairQueue[Req] = FairQueue()
    for i in range(5):
        queue.push(Req("a", f"a{i}"))
    assert [admit(queue).name for _ in range(5)] == ["a0", "a1", "a2", "a3", "a4"]
    assert queue.head() is None and len(queue) == 0


def test_a_lone_request_behind_a_flood_goes_at_the_next_admission() -> None:
    queue: FairQueue[Req] = FairQueue()
    for i in range(64):
        queue.push(Req("flood", f"f{i}"))
    assert admit(queue).name == "f0"  # the flood got there first
    queue.push(Req("lone", "l0"))  # starts level with the flood's account
    assert "l0" in [admit(queue).name, admit(queue).name]  # not behind the other 63


def test_two_busy_tenants_alternate_by_tokens_served_not_by_request_count() -> None:
    queue: FairQueue[Req] = FairQueue()
    for i in range(10):
        queue.push(Req("big", f"b{i}", prompt=300))
        queue.push(Req("small", f"s{i}", prompt=10))
    order = [admit(queue, generated=0).tenant for _ in range(12)]
    assert order.count("small") >= 10  # ten 10-token prompts cost less than one 300-token prompt
    assert order[0] == "big"  # ties go to the tenant that was backlogged first


def test_idle_time_is_not_saved_up_as_credit() -> None:
    queue: FairQueue[Req] = FairQueue()
    for i in range(30):
        queue.push(Req("steady", f"s{i}"))
    for _ in range(10):
        admit(queue)  # steady has been served 300 tokens
    for i in range(10):
        queue.push(Req("late", f"l{i}"))
    order = [admit(queue).tenant for _ in range(10)]
    assert 4 <= order.count("late") <= 6  # level from here on, not ten in a row


def test_a_request_put_back_keeps_its_place_at_the_front_of_its_tenant() -> None:
    queue: FairQueue[Req] = FairQueue()
    first, second = Req("a", "a0"), Req("a", "a1")
    queue.push(first)
    queue.push(second)
    queue.remove(first)  # its adapter was still loading
    queue.push_front(first)
    assert queue.head() is first and list(queue) == [first, second] and len(queue) == 2


def test_counters_of_tenants_gone_idle_are_dropped() -> None:
    queue: FairQueue[Req] = FairQueue()
    for t in ("a", "b", "c"):
        queue.push(Req(t, t))
        admit(queue)
    queue.forget_idle(running={"b"})
    assert set(queue.served) == {"b"}


# -- KV regions ---------------------------------------------------------------------------


def test_regions_are_first_fit_and_freed_neighbours_merge_back_whole() -> None:
    pool = RegionAllocator(100)
    a, b, c = pool.allocate(30), pool.allocate(30), pool.allocate(30)
    assert (a, b, c) == (0, 30, 60) and pool.used == 90
    assert pool.allocate(20) is None  # 10 free: a row that does not fit waits
    pool.free(30, 30)
    assert pool.allocate(20) == 30  # first fit: the hole, not the tail
    pool.free(30, 20)
    pool.free(0, 30)
    pool.free(60, 30)
    assert pool.used == 0 and pool.largest_free == 100  # all holes merged into one region
    assert pool.allocate(100) == 0


def test_fragmented_free_memory_is_not_one_region() -> None:
    pool = RegionAllocator(90)
    starts = [pool.allocate(30) for _ in range(3)]
    pool.free(starts[0], 30)
    pool.free(starts[2], 30)
    assert pool.used == 30 and pool.largest_free == 30
    assert pool.allocate(60) is None  # 60 free in all, but not in one piece
    pool.free(starts[1], 30)
    assert pool.allocate(60) == 0


@pytest.mark.parametrize(("start", "length"), [(50, 10), (45, 10), (60, 5), (95, 10)])
def test_freeing_memory_that_is_free_is_refused_and_changes_nothing(start: int, length: int) -> None:
    pool = RegionAllocator(100)
    pool.allocate(50)  # [0, 50) held, [50, 100) free
    with pytest.raises(ValueError, match="already free"):
        pool.free(start, length)
    assert pool.used == 50 and pool.largest_free == 50


def test_regions_of_no_positions_are_refused() -> None:
    with pytest.raises(ValueError):
        RegionAllocator(0)
    with pytest.raises(ValueError):
        RegionAllocator(10).allocate(0)


def test_random_allocations_never_overlap_and_all_memory_comes_back() -> None:
    rng = random.Random(7)
    pool = RegionAllocator(1000)
    held: dict[int, int] = {}
    for _ in range(2000):
        if held and rng.random() < 0.5:
            start = rng.choice(list(held))
            pool.free(start, held.pop(start))
        else:
            length = rng.randint(1, 200)
            start = pool.allocate(length)
            if start is not None:
                assert all(start + length <= s or s + n <= start for s, n in held.items())
                held[start] = length
        assert pool.used == sum(held.values())
    for start, length in held.items():
        pool.free(start, length)
    assert pool.largest_free == 1000


def test_a_pass_feeds_every_decoding_row_one_token_and_prompts_within_the_step_budget() -> None:
    decoding = [Running(prompt=5, cached=7), Running(prompt=3, cached=3)]
    long, short = Running(prompt=100), Running(prompt=10)
    plan = plan_pass([decoding[0], long, decoding[1], short], max_prefill_tokens=64, max_prefill_tokens_idle=2048)
    assert plan == [(decoding[0], 1), (decoding[1], 1), (long, 64)]  # the oldest prompt first, nobody over budget
    feed(plan)
    assert plan_pass([decoding[0], long, decoding[1], short], 64, 2048)[2:] == [(long, 36), (short, 10)]


def test_with_no_row_decoding_prompts_take_the_idle_budget() -> None:
    rows = [Running(prompt=3000), Running(prompt=10)]
    assert plan_pass(rows, 64, 2048) == [(rows[0], 2048)]
    feed(plan_pass(rows, 64, 2048))
    assert plan_pass(rows, 64, 2048) == [(rows[0], 952), (rows[1], 10)]


def test_finished_rows_are_not_fed_and_a_chunked_prompt_ends_exactly_at_its_length() -> None:
    done = Running(prompt=4, cached=6, finish_reason="stop")
    aborted = Running(prompt=50, finish_reason="abort")
    row = Running(prompt=130)
    fed = 0
    while not row.prefilled:
        plan = plan_pass([done, aborted, row], 64, 64)
        assert [r for r, _ in plan] == [row]
        fed += plan[0][1]
        feed(plan)
    assert fed == row.cached == 130


def test_later_choices_are_never_prefilled_themselves_and_decode_once_they_hold_the_prompt() -> None:
    first, second = Running(prompt=40), Running(prompt=40, follower=True)
    assert plan_pass([first, second], 64, 64) == [(first, 40)]  # the shared prompt is fed once
    feed(plan_pass([first, second], 64, 64))
    second.cached = 40  # the engine copies choice 0's keys and values into its region
    assert plan_pass([first, second], 64, 64) == [(first, 1), (second, 1)]


def test_a_prompt_whose_log_probabilities_were_asked_goes_in_small_chunks_even_when_idle() -> None:
    scored, plain = Running(prompt=300, scored=True), Running(prompt=300)
    assert plan_pass([scored, plain], 64, 2048) == [(scored, 64), (plain, 300)]
