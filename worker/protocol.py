"""Typed messages between the gateway and a worker (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class AdapterRef(BaseModel):
    """An adapter pinned to one immutable version, by the blobs that make it."""

    key: str
    weights_sha256: str
    config_sha256: str


class SamplingParams(BaseModel):
    max_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens (benchmarks: equal lengths on every line)


class ChatMessage(BaseModel):
    role: str
    content: str


class GenerateRequest(BaseModel):
    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    adapter: AdapterRef | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)


FinishReason = Literal["stop", "length", "abort", "error"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class GenerateEvent(BaseModel):
    """One line of the worker's NDJSON stream: a text delta, then one final event."""

    request_id: str
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    queue_seconds: float | None = None  # final event: time the request waited before joining the batch
    error: str | None = None
    error_status: int | None = None


class AbortRequest(BaseModel):
    request_id: str


class EvictRequest(BaseModel):
    key: str


class WorkerHealth(BaseModel):
    ready: bool
    model: str | None = None
    device: str | None = None
    running: int = 0
    waiting: int = 0
    adapters_resident: list[str] = Field(default_factory=list)
    max_context: int | None = None
    memory_bytes: int | None = None  # device memory allocated on CUDA; process RSS on CPU
    error: str | None = None
