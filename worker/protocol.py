"""Typed messages between the gateway and a worker (torch-free)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Bounds every request is held to, at the gateway's edge and again here (a worker trusts no caller).
MAX_SEED = 2**63 - 1  # torch's generators take 64 bits; 2**64 and above raised on the engine thread
MIN_TEMPERATURE = 0.01  # below this (denormals included) logits / temperature overflows: use 0 for greedy
MAX_TEMPERATURE = 2.0
MAX_SCHEMA_BYTES = 32 * 1024  # a response_format JSON schema, serialized
MAX_SCHEMA_DEPTH = 32  # objects and arrays nested in a schema (the grammar compiler recurses on them)
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API
MAX_CHOICES = 16  # n (and best_of): choices generated from one prompt, each a batch row


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


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in a JSON value (iteratively: no recursion on tenant input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


class Constraint(BaseModel):
    """Constrained decoding: the answer is a JSON object (`json_object`) or JSON valid against `json_schema`."""

    type: Literal["json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _bounded(self) -> Constraint:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        if self.json_schema is not None:
            if _depth(self.json_schema) > MAX_SCHEMA_DEPTH:  # first: serializing recurses
                raise ValueError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
            size = len(json.dumps(self.json_schema, ensure_ascii=False).encode())
            if size > MAX_SCHEMA_BYTES:
                raise ValueError(f"the JSON schema is {size} bytes; the limit is {MAX_SCHEMA_BYTES} bytes")
        return self


class SamplingParams(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)

    max_tokens: int = Field(default=128, ge=0)  # 0: the prompt only (its log probabilities, echo)
    temperature: Temperature = 0.0
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: list[Text] = Field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens (benchmarks: equal lengths on every line)
    constraint: Constraint | None = None  # response_format: every token is masked to keep the answer valid
    # OpenAI's penalties on tokens already generated: presence once, frequency per occurrence.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(
        default_factory=dict, max_length=MAX_LOGIT_BIAS)  # token id -> added to its logit
    min_tokens: int = Field(default=0, ge=0)  # EOS and stop_token_ids are impossible before this many tokens
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    # Log probabilities of each generated token and of this many most likely alternatives (None: none).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Choices from one prompt: it is prefilled once and every choice starts from its keys and values.
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    # Log probabilities of the prompt's own tokens (echo), with this many alternatives (None: none).
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    score: bool = False  # report each choice's total log probability (best_of ranks choices by it)

    @model_validator(mode="after")
    def _consistent(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is above max_tokens ({self.max_tokens})")
        if any(token < 0 for token in [*self.logit_bias, *self.stop_token_ids]):
            raise ValueError("token ids are not negative")
        return self

    def token_ids(self) -> set[int]:
        """Every token id the request names (the worker checks them against its vocabulary)."""
        return {*self.logit_bias, *self.stop_token_ids}


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    """A generated token's log probability under the model (before penalties, biases and masks)."""

    top: list[TopLogprob] = Field(default_factory=list)  # the most likely tokens at its position


class PromptLogprob(BaseModel):
    """A prompt token's log probability given the tokens before it (None for the first: nothing is)."""

    token: str
    logprob: float | None = None  # (the worker leaves None out of its lines)
    bytes: list[int]
    top: list[TopLogprob] = Field(default_factory=list)


class GenerateEvent(BaseModel):
    """One line of the worker's NDJSON stream: a text delta, then one final event."""

    request_id: str
    index: int = 0  # which choice (0 to n-1) the event is of
    text: str = ""
    progress: Usage | None = None  # text events: tokens so far, so an answer cut short is still charged
    finished: bool = False
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    queue_seconds: float | None = None  # final event: time the request waited before joining the batch
    error: str | None = None
    error_status: int | None = None
    logprobs: list[TokenLogprob] | None = None  # the tokens generated since the previous event, if asked
    cumulative_logprob: float | None = None  # final event, when `score` was asked: the choice's total
    prompt_logprobs: list[PromptLogprob] | None = None  # each choice's first event, when asked: every prompt token


class EvictRequest(BaseModel):
    key: str


class ReloadRequest(BaseModel):
    """Move the worker onto another base model (a path on its own filesystem, as the gateway's)."""

    model_path: str = Field(min_length=1, max_length=4096)
    model_name: str = Field(min_length=1, max_length=200)
    drain_s: float = Field(default=120.0, ge=0, le=3600)  # requests running may finish this long first


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
