"""OpenAI-shaped requests and responses for /v1/completions, /v1/chat/completions and /v1/models.

Fields the OpenAI client may send that loraplex does not implement are accepted when left
at their defaults and refused with a 400 naming the field otherwise: an answer must never
silently ignore what was asked.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.errors import BadRequest
from worker.protocol import ChatMessage, SamplingParams, Seed, Temperature, Text

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class StreamOptions(BaseModel):
    include_usage: bool = False


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
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: Text | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise BadRequest("n: only one choice per request is supported")
        if self.presence_penalty or self.frequency_penalty:
            raise BadRequest("presence_penalty / frequency_penalty are not supported")
        if self.logit_bias:
            raise BadRequest("logit_bias is not supported")
        unknown = sorted(k for k, v in (self.model_extra or {}).items() if v not in (None, False, 0, [], {}))
        if unknown:
            raise BadRequest(f"unsupported parameter(s): {', '.join(unknown)}")

    def sampling(self, max_tokens: int | None, limit: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        chosen = max_tokens if max_tokens is not None else min(DEFAULT_MAX_TOKENS, limit)
        return SamplingParams(max_tokens=chosen, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=stop)


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def single_prompt(self) -> str:
        if self.echo or self.logprobs is not None or (self.best_of or 1) > 1 or self.suffix:
            raise BadRequest("echo, logprobs, best_of and suffix are not supported")
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise BadRequest("prompt: send one prompt per request (a list of one string at most)")
            return self.prompt[0]
        return self.prompt


class ContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessageIn(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[ContentPart]
    name: Text | None = None

    def plain(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False

    def requested_max_tokens(self) -> int | None:
        if self.logprobs:
            raise BadRequest("logprobs is not supported")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


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


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


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


def chat_chunk(id_: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_chunk(id_: str, created: int, model: str, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"id": id_, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}
