"""The set of workers the gateway routes to, with their last reported health."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from app.errors import WorkerUnavailable
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

    @property
    def load(self) -> int:
        return max(self.in_flight, self.health.running + self.health.waiting)


class WorkerPool:
    def __init__(self, slots: list[WorkerSlot], *, poll_interval: float = 0.5, overload: int = 16) -> None:
        self.slots = slots
        self.poll_interval = poll_interval
        self.overload = overload  # a worker above this load loses its adapter affinity
        self._task: asyncio.Task[None] | None = None

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
        return bool(self.slots) and all(s.health.ready for s in self.slots)

    def any_ready(self) -> bool:
        return any(s.health.ready for s in self.slots)

    def pick(self, adapter_key: str | None, exclude: list[WorkerSlot] | None = None) -> WorkerSlot:
        """Prefer a ready worker that already holds the adapter and is not overloaded; else the least loaded."""
        ready = [s for s in self.slots if s.health.ready and not any(s is e for e in exclude or [])]
        if not ready:
            raise WorkerUnavailable("no worker is ready" + (" (others failed)" if exclude else ""), retry_after=5)
        if adapter_key is not None:
            holding = [s for s in ready if adapter_key in s.health.adapters_resident and s.load < self.overload]
            if holding:
                return min(holding, key=lambda s: s.load)
        return min(ready, key=lambda s: s.load)

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

    async def _refresh(self, slot: WorkerSlot) -> None:
        if slot.process is not None and slot.process.exited():
            slot.health = WorkerHealth(ready=False, error="worker process exited; restarting")
            slot.process.restart()
            return
        try:
            slot.health = await slot.client.health()
        except Exception as exc:
            slot.health = WorkerHealth(ready=False, error=f"unreachable: {type(exc).__name__}")
