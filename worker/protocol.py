"""Typed messages between the gateway and a worker (torch-free)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Bounds every request is held to, at the gateway's edge and again here (a worker trusts no caller).
MAX_SEED = 2**63 - 1  # torch's generators take 64 bits; 2**64 and above raised on the engine thread
MIN_TEMPERATURE = 0.01  # below this (denormals included) logits / temperature overflows: use 0 for greedy
MAX_TEMPERATURE = 2.0


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return text


def _temperature(value: float) -> float:
    if value != 0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and {MAX_TEMPERATURE}")
    return value


Text = Annotated[str, AfterValidator(_encodable)]  # tenant text: encodable, so the tokenizer can take it
Temperature = Annotated[float, AfterValidator(_temperature)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ChatRole = Literal["system", "user", "assistant"]  # the roles every chat template knows


class AdapterRef(BaseModel):
    """An adapter pinned to one immutable version, by the blobs that make it."""

    key: str
    weights_sha256: str
    config_sha256: str


class SamplingParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    max_tokens: int = Field(default=128, ge=1)
    temperature: Temperature = 0.0
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: list[Text] = Field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens (benchmarks: equal lengths on every line)


class ChatMessage(BaseModel):
    role: ChatRole
    content: Text


class GenerateRequest(BaseModel):
    request_id: str
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    adapter: AdapterRef | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    tenant: str | None = Field(default=None, max_length=200)  # whose share of the engine this uses


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
    progress: Usage | None = None  # text events: tokens so far, so an answer cut short is still charged
    finished: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    queue_seconds: float | None = None  # final event: time the request waited before joining the batch
    error: str | None = None
    error_status: int | None = None


class EvictRequest(BaseModel):
    key: str


class WorkerHealth(BaseModel):
    ready: bool
    live: bool = True  # False: the engine thread died, or made no step for the stall timeout
    model: str | None = None
    device: str | None = None
    running: int = 0
    waiting: int = 0
    adapters_resident: list[str] = Field(default_factory=list)
    max_context: int | None = None
    memory_bytes: int | None = None  # device memory allocated on CUDA; process RSS on CPU
    error: str | None = None
