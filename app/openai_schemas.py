"""OpenAI-shaped requests and responses for /v1/completions, /v1/chat/completions and /v1/models.

Fields the OpenAI client may send that loraplex does not implement are accepted when left
at their defaults and refused with a 400 naming the field otherwise: an answer must never
silently ignore what was asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import BadRequest
from worker.protocol import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    Constraint,
    PromptLogprob,
    SamplingParams,
    Seed,
    Temperature,
    Text,
    TokenLogprob,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class StreamOptions(BaseModel):
    include_usage: bool = False


def token_biases(logit_bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias keys are token ids as strings."""
    biases = {}
    for key, value in (logit_bias or {}).items():
        if not key.isascii() or not key.isdigit() or len(key) > 9:
            raise BadRequest(f"logit_bias: {key[:20]!r} is not a token id (a non-negative integer)")
        biases[int(key)] = value
    return biases


def sampling_params(**fields: Any) -> SamplingParams:
    """SamplingParams, its checks (min_tokens above max_tokens, n over its limit) as a 400 naming the field."""
    try:
        return SamplingParams(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise BadRequest(f"{where}: {message}" if where else message) from None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(default="response", max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # {}: any JSON value
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> Constraint | None:
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema is None:
            raise BadRequest("response_format: type json_schema needs a json_schema object ({name, schema})")
        schema = self.json_schema.schema_ if self.type == "json_schema" and self.json_schema else None
        try:
            return Constraint(type=self.type, json_schema=schema)
        except ValidationError as exc:
            raise BadRequest(f"response_format: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


class _SamplingFields(BaseModel):
    # Unknown extras are checked in `refuse_unsupported`; no number may be NaN or infinite.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature = Field(default=1.0, description="0 for greedy, else 0.01-2")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: Seed | None = Field(default=None, description="0 to 2**63-1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="choices from one prompt, 1-16")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS, description="token id -> -100..100, at most 300")
    user: Text | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extras, for clients that send them (extra_body)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)

    def refuse_unsupported(self) -> None:
        unknown = sorted(k for k, v in (self.model_extra or {}).items() if v not in (None, False, 0, [], {}))
        if unknown:
            raise BadRequest(f"unsupported parameter(s): {', '.join(unknown)}")

    def logprobs_width(self) -> int | None:
        """Alternatives per token to report; None: no log probabilities."""
        return None

    def sampling(self, max_tokens: int | None, limit: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        chosen = max_tokens if max_tokens is not None else min(DEFAULT_MAX_TOKENS, limit)
        constraint = self.response_format.constraint() if self.response_format is not None else None
        return sampling_params(max_tokens=chosen, temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                               stop=stop, constraint=constraint, presence_penalty=self.presence_penalty,
                               frequency_penalty=self.frequency_penalty, logit_bias=token_biases(self.logit_bias),
                               min_tokens=self.min_tokens, stop_token_ids=self.stop_token_ids or [],
                               logprobs=self.logprobs_width(), n=self.generated_choices(),
                               score=self.generated_choices() > self.n)

    def generated_choices(self) -> int:
        """Choices the worker generates: n, or more to pick the best n from (best_of)."""
        return self.n


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text]
    max_tokens: int | None = Field(default=None, ge=0, description="0 with echo: the prompt alone, scored")
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5, description="alternatives per token, 0-5")
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES,
                                description="generate this many, return the n most likely (1-16)")
    suffix: str | None = None

    def logprobs_width(self) -> int | None:
        return self.logprobs

    def generated_choices(self) -> int:
        if self.best_of is None:
            return self.n
        if self.best_of < self.n:
            raise BadRequest(f"best_of ({self.best_of}) must be at least n ({self.n})")
        if self.best_of > self.n and self.stream:
            raise BadRequest("best_of cannot be streamed: the best choices are known only at the end")
        return self.best_of

    def sampling(self, max_tokens: int | None, limit: int) -> SamplingParams:
        if max_tokens == 0 and not self.echo:
            raise BadRequest("max_tokens: 0 generates nothing; it is for scoring a prompt with echo and logprobs")
        params = super().sampling(max_tokens, limit)
        if self.echo and self.logprobs is not None:
            params = params.model_copy(update={"prompt_logprobs": self.logprobs})
        return params

    def single_prompt(self) -> str:
        if self.suffix:
            raise BadRequest("suffix is not supported")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise BadRequest("prompt: send one prompt per request (a list of one string at most)")
            return self.prompt[0]
        return self.prompt


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # image_url, input_audio, file: refused by name below

    type: str
    text: Text | None = None


def _part_text(part: ContentPart) -> str:
    if part.type != "text":
        raise BadRequest(f"content part of type {part.type[:40]!r}: the model is text-only; send text parts")
    if part.text is None:
        raise BadRequest("a text content part needs its text")
    return part.text


class ChatMessageIn(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[ContentPart]
    name: Text | None = None

    def plain(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(_part_text(p) for p in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprobs_width(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, alternatives as {token: logprob}. With echo the
    prompt's tokens come first, the very first with null: nothing comes before it."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]

    @staticmethod
    def of(entries: Sequence[TokenLogprob | PromptLogprob], offset: int = 0) -> CompletionLogprobs:
        """`offset`: characters of the answer before these tokens (streams send them piece by piece)."""
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        return CompletionLogprobs(
            tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
            top_logprobs=[None if e.logprob is None else {t.token: t.logprob for t in e.top} for e in entries],
            text_offset=offsets)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None

    @staticmethod
    def of(entries: list[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[ChatTokenLogprob(
            token=e.token, logprob=e.logprob, bytes=e.bytes,
            top_logprobs=[ChatTopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in e.top],
        ) for e in entries])  # fmt: skip


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def chat_chunk(id_: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None,
               logprobs: ChatLogprobs | None = None, index: int = 0) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason,
                         "logprobs": None if logprobs is None else logprobs.model_dump()}]}


def completion_chunk(id_: str, created: int, model: str, text: str, finish_reason: str | None,
                     logprobs: CompletionLogprobs | None = None, index: int = 0) -> dict[str, Any]:
    return {"id": id_, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason,
                         "logprobs": None if logprobs is None else logprobs.model_dump()}]}
