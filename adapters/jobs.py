"""Quantization jobs in the metadata DB (submit, claim, progress, finish) and the base models they make.

The job runner process does the work (`app/jobrunner.py`); this module is only bookkeeping,
so the gateway can use it without torch. A job is claimed by a conditional UPDATE (queued ->
running), which one runner wins on SQLite and PostgreSQL alike; on PostgreSQL the candidate
row is also read `FOR UPDATE SKIP LOCKED`, so runners do not queue behind each other's locks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from adapters.models import JOB_STATES, BaseModel, QuantizationJob, utcnow

METHODS = ("gptq", "awq")
BITS = {"gptq": (2, 3, 4, 8), "awq": (4,)}  # what GPTQModel 7.6 packs for each method
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_CALIBRATION_CHARS = 4 * 2**20
LOG_TAIL_CHARS = 4000


class InvalidJob(ValueError):
    """A job that cannot run as asked; the message names the field."""


class JobNotFound(LookupError):
    pass


class JobConflict(ValueError):
    """The job or its result name is in a state that does not allow this."""


@dataclass(frozen=True)
class QuantizeSpec:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    sym: bool = True
    calibration_samples: int = 16
    calibration_seq_len: int = 256
    calibration_text: str | None = None  # None: the corpus that ships with loraplex

    def check(self, input_sizes: set[int]) -> None:
        """Refuse what the library or the model cannot do, before anything runs."""
        if self.method not in METHODS:
            raise InvalidJob(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.bits not in BITS[self.method]:
            raise InvalidJob(f"bits={self.bits} is not available for {self.method} (allowed: {BITS[self.method]})")
        if self.group_size != -1 and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
            raise InvalidJob(f"group_size must be a power of two >= 16, or -1 (per channel); got {self.group_size}")
        bad = sorted(d for d in input_sizes if self.group_size != -1 and d % self.group_size)
        if bad:
            raise InvalidJob(f"group_size {self.group_size} does not divide the model's input dimensions {bad}")
        if not 1 <= self.calibration_samples <= 1024:
            raise InvalidJob("calibration_samples must be 1-1024")
        if not 16 <= self.calibration_seq_len <= 4096:
            raise InvalidJob("calibration_seq_len must be 16-4096")
        if self.calibration_text is not None and not self.calibration_text.strip():
            raise InvalidJob("calibration_text is empty (leave it out to use the built-in corpus)")
        if self.calibration_text is not None and len(self.calibration_text) > MAX_CALIBRATION_CHARS:
            raise InvalidJob(f"calibration_text is over {MAX_CALIBRATION_CHARS} characters (max_calibration_chars)")


class JobStore:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def submit(self, name: str, source: str, spec: QuantizeSpec) -> QuantizationJob:
        if not name or len(name) > 128 or not set(name) <= NAME_CHARS:
            raise InvalidJob("name must be 1-128 letters, digits, '.', '_' or '-'")
        with self.sessions.begin() as session:
            base = session.scalar(select(BaseModel).where(BaseModel.name == source))
            if base is None and source.isdigit():
                base = session.get(BaseModel, int(source))
            if base is None:
                raise JobNotFound(f"base model {source!r}")
            spec.check({int(shape[0]) for shape in base.linear_modules.values()})
            if session.scalar(select(BaseModel.id).where(BaseModel.name == name)) is not None:
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

    def succeed(self, job_id: int, path: str, quantization: str, report: dict[str, Any], log_tail: str) -> BaseModel:
        """Register the result as a base model and finish the job, in one transaction."""
        with self.sessions.begin() as session:
            job = session.get(QuantizationJob, job_id, with_for_update=True)
            if job is None or job.state != "running":
                raise JobConflict(f"job {job_id} is no longer running")
            source = session.get(BaseModel, job.source_id)
            assert source is not None
            result = BaseModel(name=job.name, path=path, quantization=quantization,
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
        with self.sessions.begin() as session:
            stale = list(session.scalars(select(QuantizationJob.id).where(
                QuantizationJob.state == "running", QuantizationJob.heartbeat_at < cutoff)))
            if stale:
                session.execute(
                    update(QuantizationJob).where(QuantizationJob.id.in_(stale), QuantizationJob.state == "running")
                    .values(state="failed", finished_at=utcnow(),
                            error=f"the job runner stopped (no heartbeat for {older_than.total_seconds():.0f} s)")
                )
            return stale

    def count_by_state(self) -> dict[str, int]:
        with self.sessions() as session:
            rows = session.execute(select(QuantizationJob.state, func.count()).group_by(QuantizationJob.state))
            return {state: 0 for state in JOB_STATES} | {str(state): int(n) for state, n in rows}

    def active_ids(self) -> set[int]:
        with self.sessions() as session:
            return set(session.scalars(select(QuantizationJob.id).where(QuantizationJob.state == "running")))


class BaseModels:
    """The registered base models: listing, lineage and which one the workers serve."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def all(self) -> list[BaseModel]:
        with self.sessions() as session:
            return list(session.scalars(select(BaseModel).order_by(BaseModel.id)))

    def activation_target(self, model_id: int) -> BaseModel:
        """The model to activate, refused unless it shares a root with the active one.

        The registered adapters were validated against the active base's layers, and only
        a base of the same lineage is sure to have the same ones.
        """
        models = {m.id: m for m in self.all()}
        target = models.get(model_id)
        if target is None:
            raise JobNotFound(f"base model {model_id}")
        current = next((m for m in models.values() if m.active), None)
        if current is not None and _root(target, models) != _root(current, models):
            raise JobConflict(f"{target.name} is not derived from {current.name} (or the reverse): "
                              "the registered adapters were validated against the active base")
        return target

    def set_active(self, model_id: int) -> None:
        with self.sessions.begin() as session:
            session.execute(update(BaseModel).values(active=False))
            session.execute(update(BaseModel).where(BaseModel.id == model_id).values(active=True))


def _root(model: BaseModel, models: dict[int, BaseModel]) -> int:
    while model.parent_id is not None and model.parent_id in models:
        model = models[model.parent_id]
    return model.id
