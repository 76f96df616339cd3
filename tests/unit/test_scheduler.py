"""The engine's admission order between tenants (worker.scheduler, no torch, no model)."""

from __future__ import annotations

from dataclasses import dataclass

from worker.scheduler import FairQueue


@dataclass(eq=False)
class Req:
    tenant: str
    name: str
    prompt: int = 10


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
