"""OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models.

`model` is the base model id, an adapter name (its latest version) or `name@version`, as
vLLM serves LoRA adapters; the official `openai` client works against it unmodified.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from datetime import UTC
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from adapters.models import Tenant
from adapters.registry import AdapterNotFound, ResolvedAdapter
from app import metrics
from app.deps import Services, ServicesDep, TenantDep
from app.errors import NotFound, as_api_error, error_body
from app.generation import (
    WORKER_HEADER,
    Completion,
    Generation,
    GenerationInput,
    check_limits,
    complete_unless_disconnected,
)
from app.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    chat_chunk,
    completion_chunk,
)
from worker.protocol import GenerateEvent

router = APIRouter(prefix="/v1", tags=["openai"])

Chunk = Callable[[str, str | None], dict[str, Any]]  # (text delta, finish_reason) -> one SSE payload


def _base_model_name(services: Services) -> str:
    with services.sessions() as session:
        return services.registry.active_base_model(session).name


async def _resolve_model(services: Services, tenant_id: int, model: str) -> ResolvedAdapter | None:
    base = await run_in_threadpool(_base_model_name, services)
    if model == base:
        return None
    try:
        return await run_in_threadpool(services.registry.resolve, tenant_id, model)
    except AdapterNotFound:
        raise NotFound(
            f"model {model!r} not found: use the base model {base!r} or one of your adapters (GET /v1/models)"
        ) from None


def _finish(reason: str | None) -> str | None:
    return "length" if reason == "length" else (None if reason is None else "stop")


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _stream(generation: Generation, chunk: Chunk, include_usage: bool, first: dict[str, Any] | None = None,
                  ) -> AsyncIterator[bytes]:
    """OpenAI's stream: text chunks, one with finish_reason, usage if asked, then [DONE].

    A failure after the 200 is sent as an error payload before [DONE], never as a cut socket.
    """
    try:
        if first is not None:
            yield _sse(first)
        async with aclosing(generation.events()) as events:
            async for event in events:
                for payload in _payloads(event, chunk, include_usage):
                    yield _sse(payload)
    except Exception as exc:
        err = as_api_error(exc)
        yield _sse(error_body(err.type, err.message))
    yield b"data: [DONE]\n\n"


def _payloads(event: GenerateEvent, chunk: Chunk, include_usage: bool) -> list[dict[str, Any]]:
    out = [chunk(event.text, None)] if event.text else []
    if event.finished and event.usage is not None:
        metrics.record_tokens(event.usage.prompt_tokens, event.usage.completion_tokens)
        out.append(chunk("", _finish(event.finish_reason)))
        if include_usage:
            last = chunk("", None)
            last["choices"] = []
            last["usage"] = _usage(event.usage.prompt_tokens, event.usage.completion_tokens).model_dump()
            out.append(last)
    return out


async def _start(services: Services, tenant: Tenant, model: str, job: GenerationInput) -> Generation:
    check_limits(services, job)
    adapter = await _resolve_model(services, tenant.id, model)
    return Generation(services, tenant, job, adapter)


@router.post("/completions", response_model=CompletionResponse)
async def completions(
    body: CompletionRequest, tenant: TenantDep, services: ServicesDep, request: Request, response: Response
) -> CompletionResponse | StreamingResponse:
    body.refuse_unsupported()
    sampling = body.sampling(body.max_tokens, services.settings.max_tokens_limit)
    generation = await _start(services, tenant, body.model,
                              GenerationInput(body.single_prompt(), None, None, sampling))
    id_, created = f"cmpl-{generation.request.request_id}", int(time.time())
    if body.stream:
        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return completion_chunk(id_, created, body.model, text, finish)

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(generation, chunk, include_usage), media_type="text/event-stream",
                                 headers={WORKER_HEADER: generation.slot.client.name})
    done: Completion = await complete_unless_disconnected(request, generation)
    response.headers[WORKER_HEADER] = generation.slot.client.name
    return CompletionResponse(
        id=id_, created=created, model=body.model,
        choices=[CompletionChoice(text=done.text, finish_reason=_finish(done.finish_reason))],
        usage=_usage(done.prompt_tokens, done.completion_tokens),
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    body: ChatCompletionRequest, tenant: TenantDep, services: ServicesDep, request: Request, response: Response
) -> ChatCompletionResponse | StreamingResponse:
    body.refuse_unsupported()
    sampling = body.sampling(body.requested_max_tokens(), services.settings.max_tokens_limit)
    messages = [m.plain() for m in body.messages]
    generation = await _start(services, tenant, body.model, GenerationInput(None, messages, None, sampling))
    id_, created = f"chatcmpl-{generation.request.request_id}", int(time.time())
    if body.stream:
        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return chat_chunk(id_, created, body.model, {"content": text} if text else {}, finish)

        first = chat_chunk(id_, created, body.model, {"role": "assistant", "content": ""}, None)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(generation, chunk, include_usage, first), media_type="text/event-stream",
                                 headers={WORKER_HEADER: generation.slot.client.name})
    done = await complete_unless_disconnected(request, generation)
    response.headers[WORKER_HEADER] = generation.slot.client.name
    return ChatCompletionResponse(
        id=id_, created=created, model=body.model,
        choices=[ChatChoice(message=AssistantMessage(content=done.text), finish_reason=_finish(done.finish_reason))],
        usage=_usage(done.prompt_tokens, done.completion_tokens),
    )


@router.get("/models", response_model=ModelList)
async def models(tenant: TenantDep, services: ServicesDep) -> ModelList:
    base = await run_in_threadpool(_base_model_name, services)
    adapters = await run_in_threadpool(services.registry.list_adapters, tenant.id)
    cards = [ModelCard(id=base, created=0, owned_by="loraplex")]
    for a in adapters:
        if not a.versions:
            continue
        latest = max(a.versions, key=lambda v: v.version)
        cards.append(ModelCard(
            id=a.name, created=int(latest.created_at.replace(tzinfo=UTC).timestamp()),
            owned_by=tenant.name if a.tenant_id == tenant.id else "public",
            root=f"{a.name}@{latest.version}", parent=base,
        ))  # fmt: skip
    return ModelList(data=cards)
