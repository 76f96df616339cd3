"""The worker's one configuration object, validated once and passed in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkerConfig:
    model_path: Path
    model_name: str
    blob_url: str  # a directory, file://, or s3://bucket/prefix?endpoint=... (see adapters.blobstore)
    host: str = "127.0.0.1"
    port: int = 8100
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int = 1
    max_batch_size: int = 16
    max_waiting: int = 256
    adapter_slots: int = 8  # device-resident adapters usable in one batch
    host_adapter_cache: int = 64  # parsed adapters kept in host memory behind the slots
    max_lora_rank: int = 64
    max_context: int | None = None  # defaults to the model's own limit
    # Memory for the batch's KV cache. Sized explicitly, never from total system RAM.
    kv_cache_mb: int = 2048
    max_prefill_tokens: int = 4096  # padded prompt tokens per prefill pass
    # No engine step for this long: health says not live (the gateway or Kubernetes replaces the worker).
    stall_timeout_s: float = 60.0
    keepalive_s: float = 2.0  # a blank line on each open stream this often while the engine is live

    def __post_init__(self) -> None:
        for field in ("torch_threads", "max_batch_size", "adapter_slots", "max_lora_rank", "kv_cache_mb"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1")
        if not 0 < self.keepalive_s < self.stall_timeout_s:
            raise ValueError("keepalive_s must be positive and below stall_timeout_s")
        if self.host_adapter_cache < self.adapter_slots:
            raise ValueError("host_adapter_cache must be at least adapter_slots")
