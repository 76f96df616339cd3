"""Jobs in the metadata DB (submit, claim, progress, finish); quantization jobs and the base models they make.

The job runner process does the work (`app/jobrunner.py`); this module is only bookkeeping,
so the gateway can use it without torch. A job is claimed by a conditional UPDATE (queued ->
running), which one runner wins on SQLite and PostgreSQL alike; on PostgreSQL the candidate
row is also read `FOR UPDATE SKIP LOCKED`, so runners do not queue behind each other's locks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from typing import Any, Generic, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from adapters.models import JOB_STATES, BaseCheckpoint, JobColumns, QuantizationJob, utcnow
from worker.quantize_spec import InvalidJob, QuantizeSpec

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
LOG_TAIL_CHARS = 4000
J = TypeVar("J", bound=JobColumns)


class JobNotFound(LookupError):
    pass


class JobConflict(ValueError):
    """The job or its result name is in a state that does not allow this."""


class JobTable(Generic[J]):
    """The runner's side of a job table: claim, heartbeat, finish, reap. Both kinds of job share it."""

    model: type[J]

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def claim(self, runner: str) -> J | None:
        """The oldest queued job, now running for this runner; None when there is none."""
        table = self.model
        with self.sessions.begin() as session:
            candidate = session.scalar(
                select(table.id).where(table.state == "queued")
                .order_by(table.id).limit(1).with_for_update(skip_locked=True)
            )
            if candidate is None:
                return None
            now = utcnow()
            won = session.execute(
                update(table)
                .where(table.id == candidate, table.state == "queued")
                .values(state="running", runner=runner, started_at=now, heartbeat_at=now, stage="starting")
            )
            if won.rowcount != 1:  # type: ignore[attr-defined]
                return None
        return self.get(candidate)

    def get(self, job_id: int) -> J:
        with self.sessions() as session:
            job = session.get(self.model, job_id)
            if job is None:
                raise JobNotFound(f"job {job_id}")
            return job

    def heartbeat(self, job_id: int, stage: str | None, done: int, total: int, log_tail: str,
                  events: Sequence[dict[str, Any]] = ()) -> bool:
        """Record progress (and the events the job reported since); True when the job should stop (cancelled)."""
        table = self.model
        with self.sessions.begin() as session:
            session.execute(
                update(table).where(table.id == job_id, table.state == "running")
                .values(heartbeat_at=utcnow(), stage=stage, progress_done=done, progress_total=total,
                        log_tail=log_tail[-LOG_TAIL_CHARS:])
            )
            job = session.get(table, job_id)
            if job is not None and job.state == "running" and events:
                self.record_events(session, job_id, events)
            return job is None or job.state != "running" or job.cancel_requested

    def record_events(self, session: Session, job_id: int, events: Sequence[dict[str, Any]]) -> None:
        """Events a job reported, in the heartbeat's transaction (quantization jobs report none)."""

    def finish(self, job_id: int, state: str, error: str | None = None, log_tail: str | None = None) -> bool:
        """End a running job; False when it was no longer running."""
        table = self.model
        with self.sessions.begin() as session:
            values: dict[str, Any] = {"state": state, "error": error, "finished_at": utcnow()}
            if log_tail is not None:
                values["log_tail"] = log_tail[-LOG_TAIL_CHARS:]
            ended = session.execute(update(table).where(table.id == job_id, table.state == "running").values(**values))
            return bool(getattr(ended, "rowcount", 0))

    def reap_stale(self, older_than: timedelta) -> list[int]:
        """Fail running jobs whose runner stopped sending heartbeats (it died with the job)."""
        cutoff, table = utcnow() - older_than, self.model
        # One UPDATE with the staleness in its WHERE, returning what it changed: a heartbeat that lands
        # first keeps its job, and of two runners reaping at once each job goes to exactly one.
        with self.sessions.begin() as session:
            reaped = session.scalars(
                update(table)
                .where(table.state == "running", table.heartbeat_at < cutoff)
                .values(state="failed", finished_at=utcnow(),
                        error=f"the job runner stopped (no heartbeat for {older_than.total_seconds():.0f} s)")
                .returning(table.id)
            )
            return sorted(reaped)

    def count_by_state(self) -> dict[str, int]:
        with self.sessions() as session:
            rows = session.execute(select(self.model.state, func.count()).group_by(self.model.state))
            return {state: 0 for state in JOB_STATES} | {str(state): int(n) for state, n in rows}

    def active_ids(self) -> set[int]:
        with self.sessions() as session:
            return set(session.scalars(select(self.model.id).where(self.model.state == "running")))


def cancel_row(session: Session, job: J, name: str) -> J:
    """A queued job is cancelled now; a running one when its runner next checks (seconds)."""
    if job.state == "queued":
        job.state, job.finished_at = "cancelled", utcnow()
    elif job.state == "running":
        job.cancel_requested = True
    else:
        raise JobConflict(f"{name} has already {job.state}")
    session.flush()
    session.expunge(job)
    return job


class JobStore(JobTable[QuantizationJob]):
    """Quantization jobs (admin)."""

    model = QuantizationJob

    def submit(self, name: str, source: str, spec: QuantizeSpec) -> QuantizationJob:
        if not name or len(name) > 128 or not set(name) <= NAME_CHARS:
            raise InvalidJob("name must be 1-128 letters, digits, '.', '_' or '-'")
        with self.sessions.begin() as session:
            base = session.scalar(select(BaseCheckpoint).where(BaseCheckpoint.name == source))
            if base is None and source.isdigit():
                base = session.get(BaseCheckpoint, int(source))
            if base is None:
                raise JobNotFound(f"base model {source!r}")
            spec.check({int(shape[0]) for shape in base.linear_modules.values()})
            if session.scalar(select(BaseCheckpoint.id).where(BaseCheckpoint.name == name)) is not None:
                raise JobConflict(f"a base model named {name!r} exists")
            pending = select(QuantizationJob.id).where(
                QuantizationJob.name == name, QuantizationJob.state.in_(("queued", "running")))
            if session.scalar(pending) is not None:
                raise JobConflict(f"a queued or running job already makes {name!r}")
            job = QuantizationJob(name=name, source_id=base.id, spec=asdict(spec), state="queued",
                                  progress_done=0, progress_total=0, log_tail="", cancel_requested=False)
            session.add(job)
            session.flush()
            session.expunge(job)
            return job

    def all(self) -> list[QuantizationJob]:
        with self.sessions() as session:
            return list(session.scalars(select(QuantizationJob).order_by(QuantizationJob.id.desc())))

    def cancel(self, job_id: int) -> QuantizationJob:
        with self.sessions.begin() as session:
            job = session.get(QuantizationJob, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(f"job {job_id}")
            return cancel_row(session, job, f"job {job_id}")

    def succeed(
        self, job_id: int, path: str, quantization: str, report: dict[str, Any], log_tail: str
    ) -> BaseCheckpoint:
        """Register the result as a base model and finish the job, in one transaction."""
        with self.sessions.begin() as session:
            job = session.get(QuantizationJob, job_id, with_for_update=True)
            if job is None or job.state != "running":
                raise JobConflict(f"job {job_id} is no longer running")
            source = session.get(BaseCheckpoint, job.source_id)
            assert source is not None
            result = BaseCheckpoint(name=job.name, path=path, quantization=quantization,
                               linear_modules=source.linear_modules, max_context=source.max_context,
                               parent_id=source.id, report=report, active=False)
            session.add(result)
            session.flush()
            job.result_id, job.state, job.finished_at = result.id, "succeeded", utcnow()
            job.stage, job.progress_done, job.progress_total = "done", 1, 1
            job.log_tail = log_tail[-LOG_TAIL_CHARS:]
            session.flush()
            session.expunge(result)
            return result

