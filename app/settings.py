"""Gateway settings, from LORAPLEX_* environment variables, built once in the app factory."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.jobrunner import JobRunnerConfig
from worker.auth import MIN_TOKEN_CHARS, check_token
from worker.config import KvCacheDtype, LoraDtype, WorkerConfig

_WORKER = WorkerConfig  # its class attributes are the field defaults


PLACEHOLDER = re.compile(r"replace|change.?me|example", re.IGNORECASE)  # what deploy/ ships


def _check_production_secret(name: str, value: SecretStr | None) -> None:
    """Production takes only a real secret: present, 32+ characters, not a placeholder from deploy/."""
    secret = value.get_secret_value() if value is not None else ""
    if len(secret) < MIN_TOKEN_CHARS:
        raise ValueError(f"{name} ({MIN_TOKEN_CHARS}+ random characters) is required outside development mode; "
                         "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if PLACEHOLDER.search(secret):
        raise ValueError(f"{name} is still the placeholder from the deployment files; generate a random one")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", env_file=".env", extra="ignore")

    env: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("data")
    models_dir: Path | None = None  # default: <data_dir>/models
    database_url: str | None = None  # default: SQLite file in data_dir
    blob_url: str | None = None  # default: the directory data_dir/blobs; or s3://bucket/prefix?endpoint=...
    admin_key: SecretStr | None = None
    # Shared with every worker (their LORAPLEX_WORKER_TOKEN): required for remote workers in production;
    # without it the local workers get one made up at start.
    worker_token: SecretStr | None = None
    # Per-tenant request limits counted in Redis (redis://host:6379/0), shared by every gateway replica;
    # unset: counted in this process. A gateway that dies frees its requests' slots after redis_lease_s.
    redis_url: str | None = None
    # /metrics and /metrics/workers name tenants and their usage: set this and Prometheus must send it
    # (authorization.credentials); unset, they answer anyone who reaches the gateway.
    metrics_token: SecretStr | None = None
    metrics_fanout_cache_s: float = Field(default=2.0, ge=0.0, le=60.0)  # /metrics/workers answers this old
    redis_lease_s: float = Field(default=30.0, ge=1.0, le=3600.0)
    redis_prefix: str = "loraplex:quota:"  # several deployments may share one Redis under different prefixes
    blob_sweep_interval_s: float = Field(default=3600.0, gt=0)  # unreferenced blobs are removed this often

    # Local workers spawned and supervised by the gateway.
    workers: int = Field(default=1, ge=0)
    worker_base_port: int = 8100
    worker_device: str = "auto"
    worker_threads: int = Field(default=_WORKER.torch_threads, ge=1)
    worker_start_timeout_s: float = 600.0
    # A worker whose engine makes no step for this long while it has work reports itself not live,
    # and the gateway kills and restarts a local worker that stays not live (or unreachable) this long.
    worker_stall_timeout_s: float = Field(default=_WORKER.stall_timeout_s, gt=0)
    # The gateway gives up on a worker that sends nothing (workers send a keep-alive every
    # few seconds while a request waits) for this long: the request fails over or fails.
    worker_idle_timeout_s: float = Field(default=30.0, gt=0)
    # Per worker; the defaults are WorkerConfig's (worker/config.py), the one place they are declared.
    max_batch_size: int = Field(default=_WORKER.max_batch_size, ge=1)
    max_waiting: int = Field(default=_WORKER.max_waiting, ge=1)  # queued in a worker before it answers 503
    kv_cache_mb: int = Field(default=_WORKER.kv_cache_mb, ge=1)  # sized explicitly (never from system RAM)
    kv_cache_dtype: KvCacheDtype = _WORKER.kv_cache_dtype  # what the KV pool stores (WorkerConfig)
    max_prefill_tokens: int = Field(default=_WORKER.max_prefill_tokens, ge=1)  # per step while rows decode
    max_prefill_tokens_idle: int = Field(default=_WORKER.max_prefill_tokens_idle, ge=1)  # per step, none decoding
    adapter_slots: int = Field(default=_WORKER.adapter_slots, ge=1)
    adapter_slots_mb: int | None = Field(default=_WORKER.adapter_slots_mb, ge=1)  # overrides adapter_slots
    host_adapter_cache_mb: int = Field(default=_WORKER.host_adapter_cache_mb, ge=1)  # parsed adapters behind slots
    lora_dtype: LoraDtype = _WORKER.lora_dtype  # the adapter slots' dtype (WorkerConfig)
    lora_int8_max_error: float = Field(default=_WORKER.lora_int8_max_error, gt=0, le=1)  # int8 slots' refusal
    # Quantization jobs: `serve` starts one job runner process unless this is off.
    job_runner: bool = True
    job_poll_interval_s: float = Field(default=2.0, gt=0)
    job_heartbeat_s: float = Field(default=2.0, gt=0)
    job_stale_after_s: float = Field(default=30.0, gt=0)  # no heartbeat this long: the runner died
    drain_timeout_s: float = Field(default=120.0, gt=0)  # moving a worker to another base: in-flight wait
    # Remote workers, by base URL (one code path with local ones).
    worker_urls: list[str] = Field(default_factory=list)

    # Fine-tuning (POST /v1/files, /v1/fine_tuning/jobs): run by the job runner, one job at a time per runner.
    max_training_file_bytes: int = Field(default=64 * 2**20, ge=1)  # one uploaded JSONL file
    max_training_examples: int = Field(default=50_000, ge=1)  # lines of one file
    finetune_max_example_tokens: int = Field(default=2048, ge=16)  # per example (never above the base's context)
    # Padded tokens in one forward pass of a training job, whatever its batch_size: the job's memory bound.
    finetune_micro_batch_tokens: int = Field(default=2048, ge=16)
    # A validation file's tokens in all: it is evaluated before and after training, on the runner's time.
    finetune_max_validation_tokens: int = Field(default=200_000, ge=16)
    finetune_threads: int = Field(default=2, ge=1)  # torch threads of a training process
    tenant_max_files: int = Field(default=100, ge=0)
    tenant_max_file_bytes: int = Field(default=2**30, ge=0)  # all of a tenant's files together
    finetune_max_active_jobs: int = Field(default=2, ge=1)  # a tenant's jobs queued or running
    finetune_tokens_per_day: int | None = Field(default=5_000_000, ge=1)  # trained tokens (x epochs); None: no limit

    # Per-tenant defaults (admins override them per tenant); over a limit is a 429.
    tenant_max_concurrent_requests: int = Field(default=32, ge=1)
    tenant_tokens_per_minute: int | None = Field(default=None, ge=1)  # None: unlimited
    tenant_max_adapters: int = Field(default=1000, ge=0)
    tenant_max_adapter_bytes: int = Field(default=10 * 2**30, ge=0)  # all versions of all its adapters

    # Per-tenant metric series for this many of the busiest tenants; the rest are labelled `other`.
    metrics_top_tenants: int = Field(default=20, ge=0)

    # Limits on input; each refusal names the limit.
    max_lora_rank: int = Field(default=_WORKER.max_lora_rank, ge=1)
    max_adapter_bytes: int = Field(default=256 * 1024 * 1024, ge=1)  # an upload (POST /adapters)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)  # every other request body (JSON)
    max_tokens_limit: int = Field(default=2048, ge=1)
    max_prompt_chars: int = Field(default=100_000, ge=1)  # every character of prompt, roles and contents
    max_messages: int = Field(default=256, ge=1)
    max_adapter_delta: float = Field(default=1000.0, gt=0, allow_inf_nan=False)  # largest |scale·B·A| entry
    max_stop_sequences: int = 4
    max_stop_length: int = 64

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Settings:
        if self.env == "production":
            _check_production_secret("LORAPLEX_ADMIN_KEY", self.admin_key)
            if self.worker_token is not None:
                _check_production_secret("LORAPLEX_WORKER_TOKEN", self.worker_token)
        if self.worker_token is not None:
            check_token(self.worker_token.get_secret_value(), "127.0.0.1")
        if self.env == "production" and self.worker_urls and self.worker_token is None:
            raise ValueError(f"LORAPLEX_WORKER_TOKEN ({MIN_TOKEN_CHARS}+ characters, the one the workers have) "
                             "is required for remote workers outside development mode")
        return self

    def worker_config(self, index: int, model_path: str, model_name: str, device: str) -> WorkerConfig:
        """Local worker `index`'s whole configuration, as its process receives it."""
        return WorkerConfig(
            model_path=Path(model_path), model_name=model_name, blob_url=self.resolved_blob_url,
            port=self.worker_base_port + index, device=device, torch_threads=self.worker_threads,
            max_batch_size=self.max_batch_size, max_waiting=self.max_waiting, adapter_slots=self.adapter_slots,
            host_adapter_cache_mb=self.host_adapter_cache_mb, max_lora_rank=self.max_lora_rank,
            kv_cache_mb=self.kv_cache_mb, stall_timeout_s=self.worker_stall_timeout_s,
            max_prefill_tokens=self.max_prefill_tokens, max_prefill_tokens_idle=self.max_prefill_tokens_idle,
            adapter_slots_mb=self.adapter_slots_mb, lora_dtype=self.lora_dtype,
            lora_int8_max_error=self.lora_int8_max_error, kv_cache_dtype=self.kv_cache_dtype,
        )

    def job_runner_config(self) -> JobRunnerConfig:
        return JobRunnerConfig(
            database_url=self.resolved_database_url, data_dir=self.data_dir, models_dir=self.resolved_models_dir,
            poll_interval_s=self.job_poll_interval_s, heartbeat_s=self.job_heartbeat_s,
            stale_after_s=self.job_stale_after_s, blob_url=self.resolved_blob_url, max_lora_rank=self.max_lora_rank,
            max_adapter_delta=self.max_adapter_delta, train_threads=self.finetune_threads,
            max_example_tokens=self.finetune_max_example_tokens,
            micro_batch_tokens=self.finetune_micro_batch_tokens, max_training_examples=self.max_training_examples,
            max_validation_tokens=self.finetune_max_validation_tokens,
        )

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def resolved_blob_url(self) -> str:
        """Where adapter files live; workers read them from here too, never from the gateway."""
        return self.blob_url or str(self.blob_dir.resolve())

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'loraplex.db').resolve()}"
