"""Adapter routing: every gateway replica picks the same worker for an adapter, spilling over by load."""

from __future__ import annotations

from collections import Counter

import pytest

from app import metrics
from app.workers.pool import WorkerPool, WorkerSlot
from tests.unit.fakes import FakeWorkerClient
from worker.protocol import WorkerHealth


def fleet(n: int, overload: int = 4) -> WorkerPool:
    """One gateway's view of n ready workers (another replica builds its own from the same URLs)."""
    slots = [WorkerSlot(client=FakeWorkerClient(f"w{i}"), health=WorkerHealth(ready=True)) for i in range(n)]
    return WorkerPool(slots, overload=overload)


def chosen(pool: WorkerPool, key: str | None) -> str:
    return pool.pick(key).client.name


KEYS = [f"adapter-{i:03d}" for i in range(300)]


def test_two_gateways_send_every_adapter_to_the_same_worker_and_spread_adapters_evenly() -> None:
    one, other = fleet(4), fleet(4)
    assert [chosen(one, k) for k in KEYS] == [chosen(other, k) for k in KEYS]
    share = Counter(chosen(one, k) for k in KEYS)
    assert set(share) == {"w0", "w1", "w2", "w3"} and min(share.values()) > 40  # 75 each on average


def test_a_worker_leaving_moves_only_its_own_adapters() -> None:
    pool = fleet(4)
    before = {k: chosen(pool, k) for k in KEYS}
    pool.slots[2].health = WorkerHealth(ready=False)
    after = {k: chosen(pool, k) for k in KEYS}
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "w2"}  # nobody else's adapters moved


def test_an_overloaded_worker_spills_to_the_next_in_the_adapters_own_order() -> None:
    one, other = fleet(4), fleet(4)
    key = KEYS[0]
    first = one.pick(key)
    for pool in (one, other):  # both gateways see it overloaded (workers report their own load)
        next(s for s in pool.slots if s.client.name == first.client.name).health = WorkerHealth(ready=True,
                                                                                                running=4)
    spilled = chosen(one, key)
    assert spilled != first.client.name and spilled == chosen(other, key)
    for pool in (one, other):
        for slot in pool.slots:
            slot.health = WorkerHealth(ready=True, running=9)
    assert chosen(one, key) in {"w0", "w1", "w2", "w3"}  # everyone overloaded: the least loaded still serves


def test_a_worker_already_holding_the_adapter_keeps_it_and_the_hit_is_counted() -> None:
    pool = fleet(3)
    key = KEYS[1]
    preferred = chosen(pool, key)
    holder = next(s for s in pool.slots if s.client.name != preferred)
    holder.health = WorkerHealth(ready=True, adapters_resident=[key])  # it loaded the adapter during a spill
    resident = metrics.ADAPTER_ROUTES.labels("resident")._value.get()  # type: ignore[attr-defined]
    assert chosen(pool, key) == holder.client.name  # no second copy while the holder has room
    assert metrics.ADAPTER_ROUTES.labels("resident")._value.get() == resident + 1  # type: ignore[attr-defined]


def test_base_model_requests_go_to_the_least_loaded_worker() -> None:
    pool = fleet(3)
    pool.slots[0].health = WorkerHealth(ready=True, running=3)
    pool.slots[1].health = WorkerHealth(ready=True, running=1)
    pool.slots[2].health = WorkerHealth(ready=True, running=2)
    assert chosen(pool, None) == "w1"


def test_a_fail_over_asks_again_when_its_view_says_no_worker_is_ready() -> None:
    """Another gateway rolling the workers: the one it finished is ready, but this gateway's last poll
    saw it loading, and the one being moved now just refused a request."""
    import asyncio

    from app.errors import WorkerUnavailable

    pool = fleet(2)
    moving, finished = pool.slots
    finished.health = WorkerHealth(ready=False)  # as last polled, mid-move
    assert isinstance(finished.client, FakeWorkerClient) and finished.client.ready  # as it is now
    with pytest.raises(WorkerUnavailable):
        pool.pick(None, exclude=[moving])  # the stale view has no worker for it
    assert asyncio.run(pool.pick_fresh(None, exclude=[moving])) is finished
    assert isinstance(finished.client, FakeWorkerClient)
    finished.client.ready = False  # really not ready: still a 503, after asking
    finished.health = WorkerHealth(ready=False)
    with pytest.raises(WorkerUnavailable):
        asyncio.run(pool.pick_fresh(None, exclude=[moving]))
