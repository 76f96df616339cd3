"""Which waiting request the engine admits next: fair between tenants (no torch here).

A virtual token counter per tenant, as S-LoRA's VTC: admitting a request charges its tenant for
its prompt, every generated token charges one more, and the next request admitted is the oldest
one of the backlogged tenant with the smallest counter. A tenant that floods the queue therefore
gets its share of the engine, not everyone's: a lone request from another tenant goes ahead of
the flood at the next admission. A tenant coming back after being idle starts level with the
least-served backlogged tenant, so idle time is not saved up as credit.
Requests without a tenant (benchmarks, direct callers) share one anonymous account.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    @property
    def tenant(self) -> str: ...


T = TypeVar("T", bound=Queued)


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._queues: dict[str, deque[T]] = {}  # backlogged tenants only, each oldest first
        self.served: dict[str, float] = {}  # virtual tokens charged per tenant
        self._count = 0  # kept, not summed: other threads read len() while the engine changes the queues

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return bool(self._queues)

    def __iter__(self) -> Iterator[T]:
        for queue in list(self._queues.values()):
            yield from list(queue)

    def push(self, item: T) -> None:
        tenant = item.tenant
        if tenant not in self._queues:
            if self._queues:  # no banking of idle time: start level with the least-served backlog
                floor = min(self.served.get(t, 0.0) for t in self._queues)
                self.served[tenant] = max(self.served.get(tenant, 0.0), floor)
            self._queues[tenant] = deque()
        self._queues[tenant].append(item)
        self._count += 1

    def push_front(self, item: T) -> None:
        """Put back a request taken out but not admitted (its adapter still loading)."""
        self._queues.setdefault(item.tenant, deque()).appendleft(item)
        self._count += 1

    def head(self) -> T | None:
        """The next request to admit: the oldest of the least-served backlogged tenant."""
        if not self._queues:
            return None
        tenant = min(self._queues, key=lambda t: self.served.get(t, 0.0))  # ties: first backlogged
        return self._queues[tenant][0]

    def remove(self, item: T) -> None:
        queue = self._queues[item.tenant]
        queue.remove(item)
        self._count -= 1
        if not queue:
            del self._queues[item.tenant]

    def charge(self, tenant: str, tokens: float) -> None:
        self.served[tenant] = self.served.get(tenant, 0.0) + tokens

    def forget_idle(self, running: set[str]) -> None:
        """Drop the counters of tenants with nothing queued or running (bounded memory)."""
        for tenant in [t for t in self.served if t not in self._queues and t not in running]:
            del self.served[tenant]


class RegionAllocator:
    """Contiguous regions of the KV pool's token positions: first fit, neighbours merged on free.

    A running row owns one region sized for its prompt plus its max_tokens, so its keys and values
    are one view of the pool: attention reads them in place, and admitting or retiring a row
    touches no other row's memory. Admission asks for what the row can come to need, not rows x
    the longest row.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the KV pool needs at least one token position")
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (start, length), sorted by start
        self.used = 0

    def allocate(self, length: int) -> int | None:
        """Start of a free region of `length` positions, or None while none is free."""
        if length < 1:
            raise ValueError("a region holds at least one position")
        for i, (start, size) in enumerate(self._free):
            if size >= length:
                if size == length:
                    del self._free[i]
                else:
                    self._free[i] = (start + length, size - length)
                self.used += length
                return start
        return None

    def free(self, start: int, length: int) -> None:
        """Give a region back; it merges with free neighbours so large regions come back whole."""
        i = 0
        while i < len(self._free) and self._free[i][0] < start:
            i += 1
        before = self._free[i - 1] if i > 0 else None
        after = self._free[i] if i < len(self._free) else None
        if (before is not None and before[0] + before[1] > start) or (after is not None and start + length > after[0]):
            raise ValueError(f"region [{start}, {start + length}) is already free")
        self.used -= length
        if before is not None and before[0] + before[1] == start:
            i -= 1
            start, length = before[0], before[1] + length
            del self._free[i]
        if after is not None and start + length == after[0]:
            length += after[1]
            del self._free[i]
        self._free.insert(i, (start, length))

    @property
    def largest_free(self) -> int:
        return max((size for _, size in self._free), default=0)


class Row(Protocol):
    @property
    def prefilled(self) -> bool: ...

    @property
    def prompt_ids(self) -> list[int]: ...

    @property
    def cached(self) -> int: ...

    @property
    def finish_reason(self) -> object: ...

    @property
    def follows(self) -> bool: ...

    @property
    def scores_prompt(self) -> bool: ...


R = TypeVar("R", bound=Row)


def plan_pass(running: list[R], max_prefill_tokens: int, max_prefill_tokens_idle: int) -> list[tuple[R, int]]:
    """(row, tokens it feeds) for one forward pass: every decoding row one token, then prompt chunks.

    A chunk lengthens the step every decoding row waits on, so prompts share `max_prefill_tokens`
    per step while rows decode, in admission order (the oldest prompt finishes first); with none
    decoding nobody waits on the step and they take `max_prefill_tokens_idle`.
    """
    plan = [(row, 1) for row in running if row.prefilled and row.finish_reason is None]
    budget = max_prefill_tokens if plan else max_prefill_tokens_idle
    for row in running:
        if budget <= 0:
            break
        if not row.prefilled and row.finish_reason is None and not row.follows:  # followers copy another's prompt
            # A prompt whose log probabilities were asked keeps logits of every position ([tokens, vocab]):
            # it goes in chunks of at most max_prefill_tokens, idle or not, to bound that memory.
            cap = max_prefill_tokens if row.scores_prompt else budget
            chunk = min(len(row.prompt_ids) - row.cached, budget, cap)
            plan.append((row, chunk))
            budget -= chunk
    return plan
