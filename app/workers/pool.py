"""The set of workers the gateway routes to, with their last reported health."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field

from app import metrics
from app.errors import Conflict, WorkerUnavailable
from app.workers.client import WorkerClient
from app.workers.supervisor import LocalWorkerProcess
from worker.protocol import WorkerHealth

log = logging.getLogger(__name__)


@dataclass
class WorkerSlot:
    client: WorkerClient
    process: LocalWorkerProcess | None = None  # None for a remote worker
    health: WorkerHealth = field(default_factory=lambda: WorkerHealth(ready=False))
    in_flight: int = 0  # requests this gateway has open on it
    draining: bool = False  # being moved onto another base model: no new requests
    answered: bool = False  # its health has answered since its process last started
    unwell_since: float | None = None  # when a worker that had answered stopped being live

    @property
    def load(self) -> int:
        return max(self.in_flight, self.health.running + self.health.waiting)


class WorkerPool:
    def __init__(
        self, slots: list[WorkerSlot], *, poll_interval: float = 0.5, overload: int = 16,
        hang_timeout: float = 60.0, start_timeout: float = 600.0,
    ) -> None:
        self.slots = slots
        self.poll_interval = poll_interval
        self.overload = overload  # a worker above this load loses its adapter affinity
        self.hang_timeout = hang_timeout  # a local worker not live (or unreachable) this long is killed
        self.start_timeout = start_timeout  # ... and one not ready this long after it started
        self._task: asyncio.Task[None] | None = None
        self._rolling = asyncio.Lock()  # one base model activation at a time

    async def start(self) -> None:
        for slot in self.slots:
            if slot.process is not None:
                slot.process.start()
        self._task = asyncio.create_task(self._watch(), name="worker-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for slot in self.slots:
            await slot.client.close()
            if slot.process is not None:
                await asyncio.to_thread(slot.process.stop)

    def ready(self) -> bool:
        """Every worker ready (one being moved onto a new base model does not count against it)."""
        return self.any_ready() and all(s.health.ready or s.draining for s in self.slots)

    def any_ready(self) -> bool:
        return any(s.health.ready for s in self.slots)

    def pick(self, adapter_key: str | None, exclude: list[WorkerSlot] | None = None) -> WorkerSlot:
        """The worker for a request: for an adapter, the same one on every gateway replica.

        Ready workers are ranked by rendezvous hashing of the adapter key with each worker's URL
        (every gateway lists the same URLs, so every gateway ranks alike, with no coordination;
        a worker joining or leaving moves only its own share of adapters). The first worker in
        that order that already holds the adapter and is not overloaded takes it, else the first
        not overloaded (it loads the adapter there), else the least loaded. So each adapter lives
        on as few workers as load allows. Base-model requests go to the least loaded worker.
        """
        ready = [s for s in self.slots
                 if s.health.ready and not s.draining and not any(s is e for e in exclude or [])]
        if not ready:
            raise WorkerUnavailable("no worker is ready" + (" (others failed)" if exclude else ""), retry_after=5)
        if adapter_key is None:
            return min(ready, key=lambda s: s.load)
        ranked = sorted(ready, key=lambda s: _rendezvous(adapter_key, s.client.base_url), reverse=True)
        open_ = [s for s in ranked if s.load < self.overload]
        holding = [s for s in open_ if adapter_key in s.health.adapters_resident]
        chosen = holding[0] if holding else open_[0] if open_ else min(ranked, key=lambda s: s.load)
        resident = adapter_key in chosen.health.adapters_resident
        metrics.ADAPTER_ROUTES.labels("resident" if resident else "cold").inc()
        return chosen

    async def pick_fresh(self, adapter_key: str | None, exclude: list[WorkerSlot]) -> WorkerSlot:
        """`pick`, asking the other workers for their health again first if none looked ready: another
        gateway may be moving them (a roll), and the poll's view of the one it just finished can be up
        to a poll interval old, while the one it moves next already refuses."""
        try:
            return self.pick(adapter_key, exclude)
        except WorkerUnavailable:
            await asyncio.gather(*(self._refresh(s) for s in self.slots if not any(s is e for e in exclude)))
            return self.pick(adapter_key, exclude)

    async def evict_everywhere(self, key: str) -> None:
        await asyncio.gather(*(s.client.evict(key) for s in self.slots))

    async def refresh(self) -> None:
        await asyncio.gather(*(self._refresh(s) for s in self.slots))

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("worker health poll failed")
            await asyncio.sleep(self.poll_interval)

    async def roll_onto(
        self, target: tuple[str, str], previous: tuple[str, str], *, drain_timeout: float, start_timeout: float
    ) -> list[str]:
        """Move every worker, local or remote, onto base model `target` (path, name), one at a time:
        drain, restart (local) or reload (remote, over its authenticated API), wait until it is ready
        on the new model. The others keep serving meanwhile. Returns the workers moved.

        One roll at a time: a second is a 409. If a worker cannot move, every worker already moved goes
        back to `previous`, so the fleet is on one base either way, and the error says which.
        """
        if self._rolling.locked():
            raise Conflict("another base model activation is in progress; try again when it ends")
        async with self._rolling:
            moved: list[WorkerSlot] = []
            for slot in list(self.slots):
                try:
                    await self._move(slot, target, drain_timeout, start_timeout)
                except WorkerUnavailable as exc:
                    log.error("worker %s failed on %s (%s); moving the fleet back to %s",
                              slot.client.name, target[1], exc.message, previous[1])
                    stuck = await self._move_back([*moved, slot], previous, drain_timeout, start_timeout)
                    where = (f"; could not move back: {', '.join(stuck)}" if stuck
                             else f"; every worker is back on {previous[1]!r}")
                    raise WorkerUnavailable(f"activation of {target[1]!r} failed on worker {slot.client.name}: "
                                            f"{exc.message}{where}") from None
                moved.append(slot)
                log.info("worker %s now serves %s", slot.client.name, target[1])
            return [s.client.name for s in moved]

    async def _move_back(self, slots: list[WorkerSlot], previous: tuple[str, str], drain_timeout: float,
                         start_timeout: float) -> list[str]:
        stuck = []
        for slot in slots:
            try:
                await self._move(slot, previous, drain_timeout, start_timeout)
            except WorkerUnavailable:
                log.exception("worker %s could not go back to %s", slot.client.name, previous[1])
                stuck.append(slot.client.name)
        return stuck

    async def _move(self, slot: WorkerSlot, base: tuple[str, str], drain_timeout: float,
                    start_timeout: float) -> None:
        slot.draining = True
        try:
            await self._drain(slot, drain_timeout)
            if slot.process is not None:
                await asyncio.to_thread(slot.process.stop)
                slot.process.relaunch(*base)
            else:  # the worker drains what other gateways sent it, then loads `base` in its own process
                await slot.client.reload(*base, drain_s=drain_timeout)
            slot.health = WorkerHealth(ready=False, error=f"loading {base[1]}")
            await self._wait_ready_on(slot, base[1], start_timeout)
        finally:
            slot.draining = False

    @staticmethod
    async def _drain(slot: WorkerSlot, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while slot.in_flight > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)

    async def _wait_ready_on(self, slot: WorkerSlot, model_name: str, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not (slot.health.ready and slot.health.model == model_name):
            if asyncio.get_running_loop().time() > deadline or (slot.process is not None and slot.process.exited()):
                raise WorkerUnavailable(f"worker {slot.client.name} did not come up on {model_name}")
            await asyncio.sleep(0.2)
            await self._refresh(slot)

    async def _refresh(self, slot: WorkerSlot) -> None:
        if slot.process is not None and slot.process.exited() and not slot.draining:
            slot.health = WorkerHealth(ready=False, error="worker process exited; restarting")
            if slot.process.restart():
                metrics.WORKER_RESTARTS.labels("exited").inc()
                slot.answered, slot.unwell_since = False, None
            return
        try:
            slot.health = await slot.client.health()
            slot.answered = True
        except Exception as exc:
            slot.health = WorkerHealth(ready=False, live=False, error=f"unreachable: {type(exc).__name__}")
        if slot.process is not None and not slot.draining:
            await self._replace_if_hung(slot)

    async def _replace_if_hung(self, slot: WorkerSlot) -> None:
        """Kill and restart a local worker that is alive but not serving: liveness is progress."""
        assert slot.process is not None
        now = time.monotonic()
        if slot.health.ready:
            slot.unwell_since = None
            return
        reason = None
        if slot.answered and not slot.health.live:
            slot.unwell_since = slot.unwell_since or now
            if now - slot.unwell_since > self.hang_timeout:
                reason = f"not live for {now - slot.unwell_since:.0f} s ({slot.health.error})"
        elif now - slot.process.started_at > self.start_timeout:
            reason = f"not ready {self.start_timeout:g} s after it started ({slot.health.error})"
        if reason is None:
            return
        log.error("worker %s is hung: %s; killing and restarting it", slot.client.name, reason)
        await asyncio.to_thread(slot.process.kill_and_restart)
        metrics.WORKER_RESTARTS.labels("hung").inc()
        slot.health = WorkerHealth(ready=False, error=f"restarted: {reason}")
        slot.answered, slot.unwell_since = False, None


def _rendezvous(key: str, worker_url: str) -> int:
    """The worker's weight for the key: highest random weight (rendezvous) hashing."""
    return int.from_bytes(hashlib.blake2b(f"{key}|{worker_url}".encode(), digest_size=8).digest(), "big")
