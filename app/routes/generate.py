"""POST /generate: text from the base model or a tenant's adapter, whole or streamed (SSE)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app import metrics
from app.deps import ServicesDep, TenantDep
from app.errors import as_api_error, error_body
from app.generation import (
    WORKER_HEADER,
    Generation,
    GenerationInput,
    check_limits,
    complete_unless_disconnected,
    resolve_adapter,
)
from worker.protocol import ChatMessage, SamplingParams, Seed, Temperature, Text

router = APIRouter(tags=["generation"])

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

    def to_input(self, max_tokens_limit: int) -> GenerationInput:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        max_tokens = self.max_tokens if self.max_tokens is not None else min(DEFAULT_MAX_TOKENS, max_tokens_limit)
        sampling = SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                                  top_p=self.top_p, seed=self.seed, stop=stop)
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
    check_limits(services, job)
    adapter = await resolve_adapter(services, tenant, job.adapter)
    generation = Generation(services, tenant, job, adapter)
    started = time.monotonic()
    if body.stream:
        return StreamingResponse(_sse(generation, started), media_type="text/event-stream",
                                 headers={WORKER_HEADER: generation.slot.client.name})
    completion = await complete_unless_disconnected(request, generation)
    response.headers[WORKER_HEADER] = generation.slot.client.name  # the worker that answered
    metrics.REQUEST_LATENCY.labels("/generate").observe(time.monotonic() - started)
    usage = UsagePublic(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                        total_tokens=completion.prompt_tokens + completion.completion_tokens)
    return GenerateResponse(
        text=completion.text, finish_reason=completion.finish_reason, usage=usage,
        adapter=adapter.name if adapter else None, adapter_version=adapter.version if adapter else None,
    )


def _sse_event(payload: dict[str, object]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _sse(generation: Generation, started: float) -> AsyncIterator[bytes]:
    """Token events, then a final one; a failure after the 200 ends with an error event."""
    adapter = generation.adapter
    try:
        async with aclosing(generation.events()) as events:
            async for event in events:
                if event.text:
                    yield _sse_event({"type": "token", "text": event.text})
                if event.finished and event.usage is not None:
                    metrics.record_tokens(event.usage.prompt_tokens, event.usage.completion_tokens)
                    yield _sse_event({
                        "type": "done",
                        "finish_reason": event.finish_reason,
                        "usage": {**event.usage.model_dump(), "total_tokens": event.usage.total_tokens},
                        "adapter": adapter.name if adapter else None,
                        "adapter_version": adapter.version if adapter else None,
                    })
    except Exception as exc:  # after the 200 the only way to report is in-band
        err = as_api_error(exc)
        yield _sse_event({"type": "error", **error_body(err.type, err.message)})
    finally:
        metrics.REQUEST_LATENCY.labels("/generate").observe(time.monotonic() - started)
