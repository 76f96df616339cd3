"""POST /generate: text from the base model or a tenant's adapter, whole or streamed (SSE)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from adapters.registry import ResolvedAdapter
from app.deps import ServicesDep, TenantDep
from app.errors import ApiError, error_body
from app.generation import WORKER_HEADER, GenerationInput, resolve_adapter, start
from app.json_body import StrictJsonRoute
from app.openai_schemas import ResponseFormat, sampling_params, token_biases
from worker.protocol import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, ChatMessage, GenerateEvent, Seed, Temperature, Text

router = APIRouter(tags=["generation"], route_class=StrictJsonRoute)

DEFAULT_MAX_TOKENS = 128


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    adapter: Text | None = Field(default=None, description="adapter name, or name@version")
    max_tokens: int | None = Field(default=None, ge=1, description="default: 128, or the limit if lower")
    temperature: Temperature = Field(default=0.0, description="0 for greedy, else 0.01-2")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: Seed | None = Field(default=None, description="0 to 2**63-1")
    stream: bool = False
    response_format: ResponseFormat | None = Field(default=None, description="as OpenAI's: JSON or a JSON schema")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=MAX_LOGIT_BIAS, description="token id -> -100..100, at most 300")
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)

    def to_input(self, max_tokens_limit: int) -> GenerationInput:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.max_tokens if self.max_tokens is not None else min(DEFAULT_MAX_TOKENS, max_tokens_limit)
        constraint = self.response_format.constraint() if self.response_format is not None else None
        sampling = sampling_params(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                                   seed=self.seed, stop=stop, constraint=constraint,
                                   presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                                   logit_bias=token_biases(self.logit_bias), min_tokens=self.min_tokens,
                                   stop_token_ids=self.stop_token_ids or [])
        return GenerationInput(self.prompt, self.messages, self.adapter, sampling)


class UsagePublic(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    text: str
    finish_reason: str
    usage: UsagePublic
    adapter: str | None
    adapter_version: int | None


@router.post("/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateBody, tenant: TenantDep, services: ServicesDep, request: Request, response: Response
) -> GenerateResponse | StreamingResponse:
    job = body.to_input(services.settings.max_tokens_limit)
    adapter = await resolve_adapter(services, tenant, job.adapter)
    generation = await start(services, tenant, "/generate", job, adapter)
    if body.stream:
        return generation.sse(_GenerateEvents(adapter))
    done = await generation.complete(request)
    response.headers[WORKER_HEADER] = generation.slot.client.name  # the worker that answered
    usage = UsagePublic(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                        total_tokens=done.prompt_tokens + done.completion_tokens)
    return GenerateResponse(
        text=done.text, finish_reason=done.finish_reason, usage=usage,
        adapter=adapter.name if adapter else None, adapter_version=adapter.version if adapter else None,
    )


class _GenerateEvents:
    """The /generate stream: token events, then a `done` event (or an `error` event after the 200)."""

    closing = b""

    def __init__(self, adapter: ResolvedAdapter | None) -> None:
        self.adapter = adapter

    def opening(self) -> list[dict[str, Any]]:
        return []

    def on_event(self, event: GenerateEvent) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"type": "token", "text": event.text}] if event.text else []
        if event.finished and event.usage is not None:
            out.append({
                "type": "done",
                "finish_reason": event.finish_reason,
                "usage": {**event.usage.model_dump(), "total_tokens": event.usage.total_tokens},
                "adapter": self.adapter.name if self.adapter else None,
                "adapter_version": self.adapter.version if self.adapter else None,
            })
        return out

    def on_error(self, err: ApiError) -> dict[str, Any]:
        return {"type": "error", **error_body(err.type, err.message)}
