"""Quantization jobs in the metadata DB (submit, claim, progress, finish) and the base models they make.

The job runner process does the work (`app/jobrunner.py`); this module is only bookkeeping,
so the gateway can use it without torch. A job is claimed by a conditional UPDATE (queued ->
running), which one runner wins on SQLite and PostgreSQL alike; on PostgreSQL the candidate
row is also read `FOR UPDATE SKIP LOCKED`, so runners do not queue behind each other's locks.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from adapters.models import JOB_STATES, BaseCheckpoint, QuantizationJob, utcnow
from worker.quantize_spec import InvalidJob, QuantizeSpec

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
LOG_TAIL_CHARS = 4000


class JobNotFound(LookupError):
    pass


class JobConflict(ValueError):
    """The job or its result name is in a state that does not allow this."""


class JobStore:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

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

    def get(self, job_id: int) -> QuantizationJob:
        with self.sessions() as session:
            job = session.get(QuantizationJob, job_id)
            if job is None:
                raise JobNotFound(f"job {job_id}")
            return job

    def cancel(self, job_id: int) -> QuantizationJob:
        """A queued job is cancelled now; a running one when its runner next checks (seconds)."""
        with self.sessions.begin() as session:
            job = session.get(QuantizationJob, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(f"job {job_id}")
            if job.state == "queued":
                job.state, job.finished_at = "cancelled", utcnow()
            elif job.state == "running":
                job.cancel_requested = True
            else:
                raise JobConflict(f"job {job_id} has already {job.state}")
            session.flush()
            session.expunge(job)
            return job

    # -- runner side ----------------------------------------------------------------
    def claim(self, runner: str) -> QuantizationJob | None:
        """The oldest queued job, now running for this runner; None when there is none."""
        with self.sessions.begin() as session:
            candidate = session.scalar(
                select(QuantizationJob.id).where(QuantizationJob.state == "queued")
                .order_by(QuantizationJob.id).limit(1).with_for_update(skip_locked=True)
            )
            if candidate is None:
                return None
            now = utcnow()
            won = session.execute(
                update(QuantizationJob)
                .where(QuantizationJob.id == candidate, QuantizationJob.state == "queued")
                .values(state="running", runner=runner, started_at=now, heartbeat_at=now, stage="starting")
            )
            if won.rowcount != 1:  # type: ignore[attr-defined]
                return None
        return self.get(candidate)

    def heartbeat(self, job_id: int, stage: str | None, done: int, total: int, log_tail: str) -> bool:
        """Record progress; True when the job should stop (cancelled)."""
        with self.sessions.begin() as session:
            session.execute(
                update(QuantizationJob).where(QuantizationJob.id == job_id, QuantizationJob.state == "running")
                .values(heartbeat_at=utcnow(), stage=stage, progress_done=done, progress_total=total,
                        log_tail=log_tail[-LOG_TAIL_CHARS:])
            )
            job = session.get(QuantizationJob, job_id)
            return job is None or job.state != "running" or job.cancel_requested

    def finish(self, job_id: int, state: str, error: str | None = None, log_tail: str | None = None) -> None:
        with self.sessions.begin() as session:
            values: dict[str, Any] = {"state": state, "error": error, "finished_at": utcnow()}
            if log_tail is not None:
                values["log_tail"] = log_tail[-LOG_TAIL_CHARS:]
            session.execute(update(QuantizationJob)
                            .where(QuantizationJob.id == job_id, QuantizationJob.state == "running").values(**values))

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

    def reap_stale(self, older_than: timedelta) -> list[int]:
        """Fail running jobs whose runner stopped sending heartbeats (it died with the job)."""
        cutoff = utcnow() - older_than
        # One UPDATE with the staleness in its WHERE, returning what it changed: a heartbeat that lands
        # first keeps its job, and of two runners reaping at once each job goes to exactly one.
        with self.sessions.begin() as session:
            reaped = session.scalars(
                update(QuantizationJob)
                .where(QuantizationJob.state == "running", QuantizationJob.heartbeat_at < cutoff)
                .values(state="failed", finished_at=utcnow(),
                        error=f"the job runner stopped (no heartbeat for {older_than.total_seconds():.0f} s)")
                .returning(QuantizationJob.id)
            )
            return sorted(reaped)

    def count_by_state(self) -> dict[str, int]:
        with self.sessions() as session:
            rows = session.execute(select(QuantizationJob.state, func.count()).group_by(QuantizationJob.state))
            return {state: 0 for state in JOB_STATES} | {str(state): int(n) for state, n in rows}

    def active_ids(self) -> set[int]:
        with self.sessions() as session:
            return set(session.scalars(select(QuantizationJob.id).where(QuantizationJob.state == "running")))
