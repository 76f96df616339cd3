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
