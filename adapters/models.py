"""SQLAlchemy models of the metadata DB (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Per-tenant limits; None means the service-wide default from settings.
    max_concurrent_requests: Mapped[int | None] = mapped_column(default=None)
    tokens_per_minute: Mapped[int | None] = mapped_column(default=None)
    max_adapters: Mapped[int | None] = mapped_column(default=None)
    max_adapter_bytes: Mapped[int | None] = mapped_column(BigInteger, default=None)
    # A suspended tenant's keys are refused (403); nothing of it is deleted.
    suspended_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)  # to the minute: not a write per request

    tenant: Mapped[Tenant] = relationship()


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The highest version number ever given out. The row outlives its versions (a tombstone), so a
    # number, once used, never names other weights: `name@3` deleted stays deleted.
    last_version: Mapped[int] = mapped_column(Integer, default=0)

    versions: Mapped[list[AdapterVersion]] = relationship(
        back_populates="adapter", order_by="AdapterVersion.version", cascade="all, delete-orphan"
    )


class AdapterVersion(Base):
    """One immutable upload of an adapter."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    rank: Mapped[int] = mapped_column(Integer)
    lora_alpha: Mapped[float] = mapped_column()
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    weights_sha256: Mapped[str] = mapped_column(String(64), index=True)
    config_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    declared_base_model: Mapped[str | None] = mapped_column(String(512), default=None)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Shared with every tenant. Per version: publishing never shares weights uploaded later.
    public: Mapped[bool] = mapped_column(default=False)

    adapter: Mapped[Adapter] = relationship(back_populates="versions")


class Blob(Base):
    """A stored file and how many adapter versions refer to it (blobs are shared by content).

    The count changes in the transaction that adds or removes the referring rows; a blob whose
    count reaches zero is removed from the store under this row's lock, so an upload of the same
    content at that moment either keeps it or writes it again, never loses it.
    """

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    refcount: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class BaseCheckpoint(Base):
    """A base checkpoint workers can serve, with the linear layers adapters may target."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    path: Mapped[str] = mapped_column(String(1024))
    quantization: Mapped[str] = mapped_column(String(32))
    # {"model.layers.0.self_attn.q_proj": [in_features, out_features], ...}
    linear_modules: Mapped[dict[str, Any]] = mapped_column(JSON)
    max_context: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Lineage: the base a quantization job made this one from (its adapters apply here too).
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("base_models.id"), default=None)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)  # the job's quality report


JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class JobColumns:
    """What every job the runner claims has: state, progress, heartbeats, its log's tail, times."""

    id: Mapped[int] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    progress_done: Mapped[int] = mapped_column(default=0)
    progress_total: Mapped[int] = mapped_column(default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    runner: Mapped[str | None] = mapped_column(String(128), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    log_tail: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class QuantizationJob(JobColumns, Base):
    """An offline GPTQ/AWQ run that makes a new base model; claimed by one job runner."""

    __tablename__ = "quantization_jobs"

    name: Mapped[str] = mapped_column(String(256))  # of the base model it will register
    source_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # worker.quantize_spec.QuantizeSpec fields
    result_id: Mapped[int | None] = mapped_column(ForeignKey("base_models.id"), default=None)


class TrainingFile(Base):
    """A tenant's JSONL file for fine-tuning (`POST /v1/files`), checked line by line when uploaded.

    Its bytes are a blob (content-addressed, counted in `blobs` like adapter files).
    """

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # file-<random>: ids never reveal counts
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(256))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    examples: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FineTuningJob(JobColumns, Base):
    """A tenant's QLoRA training run on the served 4-bit base; its result is one of the tenant's adapters."""

    __tablename__ = "fine_tuning_jobs"

    public_id: Mapped[str] = mapped_column(String(40), unique=True)  # ftjob-<random>
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(256))  # as asked: the base's name, or the adapter continued from
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), default=None)
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    seed: Mapped[int] = mapped_column(BigInteger)
    # The run's whole plan (worker.finetune_spec.FineTuneSpec fields, file digests, hyperparameters).
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)  # known once files are read
    fine_tuned_model: Mapped[str | None] = mapped_column(String(128), default=None)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class FineTuningEvent(Base):
    """What a fine-tuning job reports as it goes (`GET /v1/fine_tuning/jobs/{id}/events`)."""

    __tablename__ = "fine_tuning_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
