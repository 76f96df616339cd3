"""Gateway settings, from LORAPLEX_* environment variables, built once in the app factory."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", env_file=".env", extra="ignore")

    env: Literal["development", "production"] = "development"
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("data")
    models_dir: Path | None = None  # default: <data_dir>/models
    database_url: str | None = None  # default: SQLite file in data_dir
    admin_key: SecretStr | None = None

    # Local workers spawned and supervised by the gateway.
    workers: int = Field(default=1, ge=0)
    worker_base_port: int = 8100
    worker_device: str = "auto"
    worker_threads: int = Field(default=1, ge=1)
    worker_start_timeout_s: float = 600.0
    max_batch_size: int = Field(default=16, ge=1)
    adapter_slots: int = Field(default=8, ge=1)
    host_adapter_cache: int = Field(default=64, ge=1)
    # Remote workers, by base URL (one code path with local ones).
    worker_urls: list[str] = Field(default_factory=list)

    # Limits on input; each refusal names the limit.
    max_lora_rank: int = Field(default=32, ge=1)
    max_adapter_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    max_tokens_limit: int = Field(default=2048, ge=1)
    max_prompt_chars: int = Field(default=100_000, ge=1)
    max_stop_sequences: int = 4
    max_stop_length: int = 64

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Settings:
        if self.env == "production":
            if self.admin_key is None or len(self.admin_key.get_secret_value()) < 16:
                raise ValueError("LORAPLEX_ADMIN_KEY (16+ characters) is required outside development mode")
        return self

    @property
    def resolved_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'loraplex.db').resolve()}"
