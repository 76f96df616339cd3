"""OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models.

`model` is the base model id, an adapter name (its latest version) or `name@version`, as
vLLM serves LoRA adapters; the official `openai` client works against it unmodified.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from adapters.models import Tenant
from adapters.registry import AdapterNotFound, ResolvedAdapter
from app.deps import Services, ServicesDep, TenantDep
from app.errors import ApiError, NotFound, error_body
from app.generation import WORKER_HEADER, Generation, GenerationInput, start
from app.json_body import StrictJsonRoute
from app.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    chat_chunk,
    completion_chunk,
)
from worker.protocol import GenerateEvent, PromptLogprob, TokenLogprob

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictJsonRoute)

# Its tokens' log probabilities: the prompt's first (echo), then the generated ones.
Logprobs = list[TokenLogprob | PromptLogprob]
# (choice index, text delta, finish_reason, its tokens' log probabilities if asked) -> one SSE payload
Chunk = Callable[[int, str, str | None, Logprobs | None], dict[str, Any]]


def _base_model_name(services: Services) -> str:
    return services.base_models.active().name  # cached; a miss reads the database


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


class _OpenAIChunks:
    """OpenAI's stream: text chunks (each of one choice, by index), one with finish_reason per choice,
    usage if asked once all have finished, then [DONE]; a failure after the 200 is an error payload
    before [DONE]."""

    closing = b"data: [DONE]\n\n"

    def __init__(self, chunk: Chunk, include_usage: bool, choices: int,
                 first: Callable[[int], dict[str, Any]] | None = None) -> None:
        self.chunk, self.include_usage, self.choices, self.first = chunk, include_usage, choices, first
        self.ended: dict[int, int] = {}  # choice -> its completion tokens
        self.prompt_tokens = 0

    def opening(self) -> list[dict[str, Any]]:
        return [self.first(i) for i in range(self.choices)] if self.first is not None else []

    def on_event(self, event: GenerateEvent) -> list[dict[str, Any]]:
        i = event.index
        logprobs: Logprobs | None = None
        if event.logprobs is not None or event.prompt_logprobs is not None:
            logprobs = [*(event.prompt_logprobs or []), *(event.logprobs or [])]
        out = [self.chunk(i, event.text, None, logprobs)] if event.text or logprobs else []
        if event.finished and event.usage is not None:
            out.append(self.chunk(i, "", _finish(event.finish_reason), None))
            self.ended[i], self.prompt_tokens = event.usage.completion_tokens, event.usage.prompt_tokens
            if self.include_usage and len(self.ended) == self.choices:
                last = self.chunk(0, "", None, None)
                last["choices"] = []
                last["usage"] = _usage(self.prompt_tokens, sum(self.ended.values())).model_dump()
                out.append(last)
        return out

    def on_error(self, err: ApiError) -> dict[str, Any]:
        return error_body(err.type, err.message)


async def _start(services: Services, tenant: Tenant, route: str, model: str, job: GenerationInput) -> Generation:
    adapter = await _resolve_model(services, tenant.id, model)
    return await start(services, tenant, route, job, adapter)


@router.post("/completions", response_model=CompletionResponse)
async def completions(
    body: CompletionRequest, tenant: TenantDep, services: ServicesDep, request: Request, response: Response
) -> CompletionResponse | StreamingResponse:
    body.refuse_unsupported()
    sampling = body.sampling(body.max_tokens, services.settings.max_tokens_limit)
    prompt = body.single_prompt()
    generation = await _start(services, tenant, "/v1/completions", body.model,
                              GenerationInput(prompt, None, None, sampling))
    id_, created = f"cmpl-{generation.request.request_id}", int(time.time())
    echo = prompt if body.echo else ""
    if body.stream:
        offsets = [0] * body.n  # characters of each answer already sent: the logprobs' text_offset
        echoed = [False] * body.n

        def chunk(index: int, text: str, finish: str | None, logprobs: Logprobs | None) -> dict[str, Any]:
            if not echoed[index]:  # the prompt leads each choice's first chunk
                echoed[index], text = True, echo + text
            shaped = None if logprobs is None else CompletionLogprobs.of(logprobs, offsets[index])
            offsets[index] += len(text)
            return completion_chunk(id_, created, body.model, text, finish, shaped, index)

        return generation.sse(_OpenAIChunks(chunk, _include_usage(body), body.n))
    done = await generation.complete(request)
    response.headers[WORKER_HEADER] = generation.slot.client.name
    return CompletionResponse(
        id=id_, created=created, model=body.model,
        choices=[CompletionChoice(index=c.index, text=echo + c.text, finish_reason=_finish(c.finish_reason),
                                  logprobs=None if c.logprobs is None
                                  else CompletionLogprobs.of([*(c.prompt_logprobs or []), *c.logprobs]))
                 for c in done.best(body.n)],
        usage=_usage(done.prompt_tokens, done.completion_tokens),  # every choice generated is charged
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(
    body: ChatCompletionRequest, tenant: TenantDep, services: ServicesDep, request: Request, response: Response
) -> ChatCompletionResponse | StreamingResponse:
    body.refuse_unsupported()
    sampling = body.sampling(body.requested_max_tokens(), services.settings.max_tokens_limit)
    messages = [m.plain() for m in body.messages]
    generation = await _start(services, tenant, "/v1/chat/completions", body.model,
                              GenerationInput(None, messages, None, sampling))
    id_, created = f"chatcmpl-{generation.request.request_id}", int(time.time())
    if body.stream:
        def chunk(index: int, text: str, finish: str | None, logprobs: Logprobs | None) -> dict[str, Any]:
            shaped = None if logprobs is None else ChatLogprobs.of([e for e in logprobs if isinstance(e, TokenLogprob)])
            return chat_chunk(id_, created, body.model, {"content": text} if text else {}, finish, shaped, index)

        def first(index: int) -> dict[str, Any]:
            return chat_chunk(id_, created, body.model, {"role": "assistant", "content": ""}, None, None, index)

        return generation.sse(_OpenAIChunks(chunk, _include_usage(body), body.n, first))
    done = await generation.complete(request)
    response.headers[WORKER_HEADER] = generation.slot.client.name
    return ChatCompletionResponse(
        id=id_, created=created, model=body.model,
        choices=[ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                            finish_reason=_finish(c.finish_reason),
                            logprobs=None if c.logprobs is None else ChatLogprobs.of(c.logprobs))
                 for c in done.choices],
        usage=_usage(done.prompt_tokens, done.completion_tokens),
    )


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


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
            owned_by=tenant.name if a.owner_id == tenant.id else "public",
            root=f"{a.name}@{latest.version}", parent=base,
        ))  # fmt: skip
    return ModelList(data=cards)
