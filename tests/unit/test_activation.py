"""Activating a base model rolls every worker, remote ones included, one at a time, or none."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import Conflict, WorkerUnavailable
from app.workers.pool import WorkerPool, WorkerSlot
from tests.unit.fakes import FakeWorkerClient
from worker.protocol import WorkerHealth

OLD, NEW = ("/models/base", "base"), ("/models/base-gptq", "base-gptq")


def remote_fleet(n: int) -> tuple[WorkerPool, list[FakeWorkerClient]]:
    clients = [FakeWorkerClient(f"remote-{i}") for i in range(n)]
    for c in clients:
        c.model = OLD[1]
    slots = [WorkerSlot(client=c, health=WorkerHealth(ready=True, model=OLD[1])) for c in clients]
    return WorkerPool(slots), clients


def roll(pool: WorkerPool) -> list[str]:
    return asyncio.run(pool.roll_onto(NEW, OLD, drain_timeout=1, start_timeout=2))


def test_every_remote_worker_moves_one_at_a_time() -> None:
    pool, clients = remote_fleet(3)
    assert roll(pool) == ["remote-0", "remote-1", "remote-2"]
    assert all(c.reloads == [NEW] and c.model == NEW[1] for c in clients)
    assert all(s.health.ready and s.health.model == NEW[1] and not s.draining for s in pool.slots)


def test_a_worker_that_cannot_move_brings_the_moved_ones_back() -> None:
    pool, clients = remote_fleet(3)
    clients[1].cannot_load = {NEW[1]}
    with pytest.raises(WorkerUnavailable, match=r"failed on worker remote-1.*every worker is back on 'base'"):
        roll(pool)
    assert [c.model for c in clients] == [OLD[1]] * 3  # one base across the fleet
    assert clients[0].reloads == [NEW, OLD] and clients[1].reloads == [NEW, OLD] and clients[2].reloads == []


def test_a_second_activation_while_one_rolls_is_a_409() -> None:
    pool, _ = remote_fleet(2)

    async def both() -> None:
        first = asyncio.create_task(pool.roll_onto(NEW, OLD, drain_timeout=1, start_timeout=2))
        await asyncio.sleep(0)  # the first holds the roll
        with pytest.raises(Conflict, match="another base model activation is in progress"):
            await pool.roll_onto(NEW, OLD, drain_timeout=1, start_timeout=2)
        assert await first == ["remote-0", "remote-1"]

    pool.slots[0].in_flight = 1  # the first roll waits a little for it to drain

    async def finish_request() -> None:
        await asyncio.sleep(0.3)
        pool.slots[0].in_flight = 0

    async def scenario() -> None:
        await asyncio.gather(both(), finish_request())

    asyncio.run(scenario())
