"""The gateway replaces local workers that are hung, not only those that exited: liveness is progress."""

from __future__ import annotations

import asyncio
import time

from app import metrics
from app.workers.pool import WorkerPool, WorkerSlot
from tests.unit.fakes import FakeWorkerClient
from worker.protocol import WorkerHealth


class FakeProcess:
    """Stands in for LocalWorkerProcess: counts restarts, never exits by itself."""

    def __init__(self) -> None:
        self.started_at = 0.0
        self.kills = 0

    def exited(self) -> bool:
        return False

    def restart(self) -> bool:
        return True

    def kill_and_restart(self) -> None:
        self.kills += 1


class ScriptedClient(FakeWorkerClient):
    def __init__(self) -> None:
        super().__init__("scripted")
        self.state: WorkerHealth | None = WorkerHealth(ready=True)  # None: health does not answer

    async def health(self) -> WorkerHealth:
        if self.state is None:
            raise TimeoutError("no answer")
        return self.state


def make_pool(monkeypatch, clock: list[float]) -> tuple[WorkerPool, WorkerSlot, ScriptedClient, FakeProcess]:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("app.workers.pool.time.monotonic", lambda: clock[0])
    client, process = ScriptedClient(), FakeProcess()
    slot = WorkerSlot(client=client, process=process)  # type: ignore[arg-type]
    return WorkerPool([slot], hang_timeout=10.0, start_timeout=100.0), slot, client, process


def poll_at(pool: WorkerPool, clock: list[float], when: float) -> None:
    clock[0] = when
    asyncio.run(pool.refresh())


def test_a_worker_that_stops_answering_is_killed_after_the_hang_timeout(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = [0.0]
    pool, slot, client, process = make_pool(monkeypatch, clock)
    poll_at(pool, clock, 1.0)
    assert slot.health.ready
    client.state = None  # frozen (SIGSTOP, a GIL held by a runaway loop): alive, but silent
    poll_at(pool, clock, 2.0)
    poll_at(pool, clock, 11.0)
    assert process.kills == 0 and not slot.health.ready  # not routed to, not yet replaced
    hung_before = metrics.WORKER_RESTARTS.labels("hung")._value.get()
    poll_at(pool, clock, 12.5)
    assert process.kills == 1
    assert "restarted" in (slot.health.error or "")
    assert metrics.WORKER_RESTARTS.labels("hung")._value.get() == hung_before + 1  # operators see it


def test_a_worker_whose_engine_died_or_stalled_is_replaced(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = [0.0]
    pool, _, client, process = make_pool(monkeypatch, clock)
    poll_at(pool, clock, 1.0)
    client.state = WorkerHealth(ready=False, live=False, error="the engine thread died: RuntimeError")
    poll_at(pool, clock, 2.0)
    assert process.kills == 0
    poll_at(pool, clock, 13.0)
    assert process.kills == 1


def test_a_recovering_worker_is_left_alone(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = [0.0]
    pool, _, client, process = make_pool(monkeypatch, clock)
    poll_at(pool, clock, 1.0)
    client.state = None
    poll_at(pool, clock, 2.0)
    client.state = WorkerHealth(ready=True)  # a long step, then back
    poll_at(pool, clock, 5.0)
    client.state = None
    poll_at(pool, clock, 8.0)
    poll_at(pool, clock, 15.0)  # 7 s since it went quiet the second time
    assert process.kills == 0


def test_a_loading_worker_gets_the_start_timeout_not_the_hang_timeout(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    clock = [0.0]
    pool, _, client, process = make_pool(monkeypatch, clock)
    client.state = None  # not listening yet
    poll_at(pool, clock, 50.0)
    client.state = WorkerHealth(ready=False)  # live, loading its base model
    poll_at(pool, clock, 90.0)
    assert process.kills == 0
    poll_at(pool, clock, 101.0)
    assert process.kills == 1


def test_the_job_runner_is_restarted_when_it_exits_and_stopped_with_serve() -> None:
    import subprocess
    import sys

    from app.workers.supervisor import SupervisedProcess

    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        code = "raise SystemExit(3)" if not started else "import time; time.sleep(60)"  # dies once, then runs
        started.append(subprocess.Popen([sys.executable, "-c", code]))
        return started[-1]

    supervised = SupervisedProcess("job runner", start, poll_s=0.05)
    deadline = time.monotonic() + 10
    while supervised.restarts < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert supervised.restarts == 1 and started[0].returncode == 3 and started[1].poll() is None
    supervised.stop(timeout=5)
    assert started[1].poll() is not None and len(started) == 2  # stopped, and not started again
