"""Fine-tuning bookkeeping in the metadata DB: tenants' training files, jobs, their events and limits.

Everything here is scoped to one tenant: another tenant's file or job is "not found", never
"forbidden". The job runner (`app/jobrunner.py`) claims jobs through the same `JobTable` as
quantization jobs and registers each result through the adapter registry, like an upload.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from adapters.blobrefs import BlobReferences
from adapters.jobs import JobConflict, JobNotFound, JobTable, cancel_row
from adapters.models import FineTuningEvent, FineTuningJob, TrainingFile, utcnow
from adapters.peft_format import Buffer
from adapters.registry import StorageQuota, check_quota, hold_tenant

ACTIVE = ("queued", "running")
MIN_TRAINING_EXAMPLES = 10
DAY = timedelta(days=1)
_WRITE_ATTEMPTS = 8


class FileNotFound(LookupError):
    pass


class FileQuotaExceeded(RuntimeError):
    """The tenant holds as many files (or bytes of them) as it may; the message names the limit."""


class FineTuneQuotaExceeded(RuntimeError):
    """Too many jobs at once, or the day's trained tokens spent; `retry_after` in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class FineTuneLimits:
    max_active_jobs: int  # queued and running, per tenant
    tokens_per_day: int | None  # trained tokens (file tokens x epochs) over the last 24 hours; None: no limit


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class TrainingFiles:
    def __init__(self, sessions: sessionmaker[Session], blob_refs: BlobReferences) -> None:
        self.sessions = sessions
        self.blob_refs = blob_refs

    def create(self, tenant_id: int, filename: str, purpose: str, data: Buffer, examples: int,
               max_files: int, max_bytes: int) -> TrainingFile:
        """Store a checked file; the blob is written under its reference row's lock, in this transaction."""
        for attempt in range(_WRITE_ATTEMPTS):
            try:
                with self.sessions.begin() as session:
                    hold_tenant(session, tenant_id)
                    count, stored = session.execute(
                        select(func.count(), func.coalesce(func.sum(TrainingFile.bytes), 0))
                        .where(TrainingFile.tenant_id == tenant_id)).one()
                    if count >= max_files:
                        raise FileQuotaExceeded(f"the tenant already has {count} files, its limit "
                                                "(tenant_max_files); delete one first")
                    if stored + len(data) > max_bytes:
                        raise FileQuotaExceeded(f"storing {len(data)} more bytes would put the tenant's files at "
                                                f"{stored + len(data)} bytes, over its limit of {max_bytes} "
                                                "(tenant_max_file_bytes); delete old files first")
                    row = TrainingFile(id=new_id("file"), tenant_id=tenant_id, filename=filename[:256],
                                       purpose=purpose, bytes=len(data), examples=examples,
                                       sha256=self.blob_refs.hold(session, data))
                    session.add(row)
                    session.flush()
                    session.expunge(row)
                    return row
            except (IntegrityError, OperationalError):  # the same content's first upload raced this one
                if attempt == _WRITE_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def all(self, tenant_id: int) -> list[TrainingFile]:
        with self.sessions() as session:
            return list(session.scalars(select(TrainingFile).where(TrainingFile.tenant_id == tenant_id)
                                        .order_by(TrainingFile.created_at.desc(), TrainingFile.id)))

    def get(self, tenant_id: int, file_id: str) -> TrainingFile:
        with self.sessions() as session:
            return _own_file(session, tenant_id, file_id)

    def delete(self, tenant_id: int, file_id: str) -> None:
        """Refused (409) while a queued or running job of the tenant reads the file."""
        with self.sessions.begin() as session:
            row = _own_file(session, tenant_id, file_id, lock=True)
            user = session.scalar(select(FineTuningJob.public_id).where(
                FineTuningJob.tenant_id == tenant_id, FineTuningJob.state.in_(ACTIVE),
                (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id)).limit(1))
            if user is not None:
                raise JobConflict(f"file {file_id} is used by fine-tuning job {user}, which has not finished; "
                                  "cancel it or wait")
            digest = row.sha256
            session.delete(row)
            self.blob_refs.release(session, [digest])
        self.blob_refs.collect([digest])

    def delete_tenant_files(self, session: Session, tenant_id: int) -> list[str]:
        """Within the caller's transaction (deleting the tenant); returns digests to collect after it."""
        digests = list(session.scalars(select(TrainingFile.sha256).where(TrainingFile.tenant_id == tenant_id)))
        session.execute(delete(TrainingFile).where(TrainingFile.tenant_id == tenant_id))
        self.blob_refs.release(session, digests)
        return digests


def _own_file(session: Session, tenant_id: int, file_id: str, lock: bool = False) -> TrainingFile:
    row = session.get(TrainingFile, file_id, with_for_update=lock)
    if row is None or row.tenant_id != tenant_id:
        raise FileNotFound(f"file {file_id!r} not found")
    return row


@dataclass(frozen=True)
class JobRequest:
    """A checked `POST /v1/fine_tuning/jobs`, with the hyperparameters resolved."""

    model: str
    base_model_id: int
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    spec: dict[str, Any]  # FineTuneSpec fields, the continued adapter's digests, the limits it runs under


class FineTuningJobs(JobTable[FineTuningJob]):
    model = FineTuningJob

    def submit(self, tenant_id: int, request: JobRequest, limits: FineTuneLimits,
               storage: StorageQuota) -> FineTuningJob:
        with self.sessions.begin() as session:
            hold_tenant(session, tenant_id)
            for file_id in filter(None, (request.training_file, request.validation_file)):
                _own_file(session, tenant_id, file_id)
            training = _own_file(session, tenant_id, request.training_file)
            if training.examples < MIN_TRAINING_EXAMPLES:
                raise InvalidFineTuneRequest(
                    f"training file {training.id} has {training.examples} examples; fine-tuning needs at least "
                    f"{MIN_TRAINING_EXAMPLES}", param="training_file")
            self._check_limits(session, tenant_id, limits)
            check_quota(session, tenant_id, storage, new_name=True, new_bytes=0)
            job = FineTuningJob(
                public_id=new_id("ftjob"), tenant_id=tenant_id, model=request.model,
                base_model_id=request.base_model_id, training_file=request.training_file,
                validation_file=request.validation_file, suffix=request.suffix, seed=request.seed,
                spec={**request.spec, "storage_quota": asdict(storage), "tokens_per_day": limits.tokens_per_day},
                state="queued", progress_done=0, progress_total=0, log_tail="", cancel_requested=False,
            )
            session.add(job)
            session.flush()
            session.add(FineTuningEvent(job_id=job.id, message=f"Created fine-tuning job {job.public_id}"))
            session.flush()
            session.expunge(job)
            return job

    @staticmethod
    def _check_limits(session: Session, tenant_id: int, limits: FineTuneLimits) -> None:
        active = session.scalar(select(func.count()).where(
            FineTuningJob.tenant_id == tenant_id, FineTuningJob.state.in_(ACTIVE))) or 0
        if active >= limits.max_active_jobs:
            raise FineTuneQuotaExceeded(
                f"the tenant has {active} fine-tuning jobs queued or running, its limit "
                f"(finetune_max_active_jobs); wait for one to finish or cancel one", retry_after=60)
        limit = limits.tokens_per_day
        if limit is None:
            return
        since = utcnow() - DAY
        used, oldest = session.execute(
            select(func.coalesce(func.sum(FineTuningJob.trained_tokens), 0), func.min(FineTuningJob.created_at))
            .where(FineTuningJob.tenant_id == tenant_id, FineTuningJob.created_at > since,
                   FineTuningJob.trained_tokens.is_not(None))).one()
        used = int(used or 0)
        if used >= limit:
            wait = int(((oldest or utcnow()) + DAY - utcnow()).total_seconds()) + 1
            raise FineTuneQuotaExceeded(
                f"the tenant trained {used} tokens in the last 24 hours, its limit of {limit} "
                "(finetune_tokens_per_day)", retry_after=max(wait, 1))

    def tokens_left_today(self, job: FineTuningJob) -> int | None:
        """What the job may train: the day's limit it was submitted under, less the tenant's other jobs'."""
        limit = job.spec.get("tokens_per_day")
        if limit is None:
            return None
        with self.sessions() as session:
            used = session.scalar(select(func.coalesce(func.sum(FineTuningJob.trained_tokens), 0)).where(
                FineTuningJob.tenant_id == job.tenant_id, FineTuningJob.id != job.id,
                FineTuningJob.created_at > utcnow() - DAY, FineTuningJob.trained_tokens.is_not(None))) or 0
        return max(0, int(limit) - int(used))

    def page(self, tenant_id: int, after: str | None, limit: int) -> tuple[list[FineTuningJob], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        with self.sessions() as session:
            query = select(FineTuningJob).where(FineTuningJob.tenant_id == tenant_id)
            if after is not None:
                query = query.where(FineTuningJob.id < self._own(session, tenant_id, after).id)
            rows = list(session.scalars(query.order_by(FineTuningJob.id.desc()).limit(limit + 1)))
            return rows[:limit], len(rows) > limit

    def find(self, tenant_id: int, public_id: str) -> FineTuningJob:
        with self.sessions() as session:
            return self._own(session, tenant_id, public_id)

    def cancel_job(self, tenant_id: int, public_id: str) -> FineTuningJob:
        with self.sessions.begin() as session:
            job = self._own(session, tenant_id, public_id, lock=True)
            if job.state == "queued":
                session.add(FineTuningEvent(job_id=job.id, message="Fine-tuning job cancelled"))
            return cancel_row(session, job, f"fine-tuning job {public_id}")

    def events(self, tenant_id: int, public_id: str, after: str | None, limit: int
               ) -> tuple[list[FineTuningEvent], bool]:
        """Newest first; `after` is the id (`ftevent-<n>`) of the last event of the previous page."""
        with self.sessions() as session:
            job = self._own(session, tenant_id, public_id)
            query = select(FineTuningEvent).where(FineTuningEvent.job_id == job.id)
            if after is not None:
                number = after.removeprefix("ftevent-")
                if not number.isdigit():
                    raise JobNotFound(f"event {after!r} not found")
                query = query.where(FineTuningEvent.id < int(number))
            rows = list(session.scalars(query.order_by(FineTuningEvent.id.desc()).limit(limit + 1)))
            return rows[:limit], len(rows) > limit

    @staticmethod
    def _own(session: Session, tenant_id: int, public_id: str, lock: bool = False) -> FineTuningJob:
        query = select(FineTuningJob).where(FineTuningJob.public_id == public_id)
        job = session.scalar(query.with_for_update() if lock else query)
        if job is None or job.tenant_id != tenant_id:
            raise JobNotFound(f"fine-tuning job {public_id!r} not found")
        return job

    # -- runner side ----------------------------------------------------------------------
    def record_events(self, session: Session, job_id: int, events: Sequence[dict[str, Any]]) -> None:
        for e in events:
            data = e.get("data") if isinstance(e.get("data"), dict) else None
            session.add(FineTuningEvent(job_id=job_id, message=str(e.get("message", ""))[:2000],
                                        type="metrics" if e.get("type") == "metrics" else "message",
                                        level="error" if e.get("level") == "error" else "info", data=data))
            if data is not None and isinstance(data.get("trained_tokens"), int):
                # Counted against the day's limit from the moment the files are read, whatever happens next.
                session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                                .values(trained_tokens=data["trained_tokens"]))

    def end(self, job_id: int, state: str, message: str | None, log_tail: str, code: str | None = None) -> bool:
        """Fail or cancel a running job, with its last event; False when it was no longer running."""
        ended = self.finish(job_id, state, error=None if message is None else f"{code or 'error'}: {message}",
                            log_tail=log_tail)
        if ended:
            text = "Fine-tuning job cancelled" if state == "cancelled" else f"Fine-tuning job failed: {message}"
            with self.sessions.begin() as session:
                session.add(FineTuningEvent(job_id=job_id, message=text,
                                            level="error" if state == "failed" else "info"))
        return ended

    def succeed(self, job_id: int, fine_tuned_model: str, report: dict[str, Any], log_tail: str) -> bool:
        """Finish the job with its result; False when it was no longer running (cancelled at the last moment)."""
        with self.sessions.begin() as session:
            done = session.execute(
                update(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.state == "running")
                .values(state="succeeded", finished_at=utcnow(), fine_tuned_model=fine_tuned_model, report=report,
                        trained_tokens=report.get("trained_tokens"), stage="done", log_tail=log_tail[-4000:]))
            if not getattr(done, "rowcount", 0):
                return False
            session.add(FineTuningEvent(job_id=job_id, message=f"New fine-tuned model created: {fine_tuned_model}"))
            session.add(FineTuningEvent(job_id=job_id, message="The job has successfully completed"))
            return True

    def finished_durations(self) -> list[float]:
        with self.sessions() as session:
            rows = session.execute(select(FineTuningJob.started_at, FineTuningJob.finished_at).where(
                FineTuningJob.started_at.is_not(None), FineTuningJob.finished_at.is_not(None)))
            return [(end - start).total_seconds() for start, end in rows if start is not None and end is not None]

    def tokens_trained(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.coalesce(func.sum(FineTuningJob.trained_tokens), 0)).where(
                FineTuningJob.state == "succeeded")) or 0)


class InvalidFineTuneRequest(ValueError):
    """A job that cannot run as asked; `param` names the field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
