"""Generation service: resolve the adapter once, pick a worker, relay its events."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from adapters.models import Tenant
from adapters.registry import ResolvedAdapter
from app import metrics
from app.deps import Services
from app.errors import BadRequest, GenerationFailed, WorkerUnavailable
from worker.protocol import AdapterRef, ChatMessage, GenerateEvent, GenerateRequest, SamplingParams


@dataclass(frozen=True)
class GenerationInput:
    prompt: str | None
    messages: list[ChatMessage] | None
    adapter: str | None
    sampling: SamplingParams


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def check_limits(services: Services, job: GenerationInput) -> None:
    """Refuse input over the configured limits, naming the limit."""
    s = services.settings
    if (job.prompt is None) == (job.messages is None):
        raise BadRequest("give exactly one of 'prompt' or 'messages'")
    if job.messages is not None and not job.messages:
        raise BadRequest("'messages' must not be empty")
    chars = len(job.prompt or "") + sum(len(m.content) for m in job.messages or [])
    if chars > s.max_prompt_chars:
        raise BadRequest(f"the prompt has {chars} characters; the limit is {s.max_prompt_chars} (max_prompt_chars)")
    if job.sampling.max_tokens > s.max_tokens_limit:
        raise BadRequest(f"max_tokens {job.sampling.max_tokens} is above the limit of {s.max_tokens_limit}")
    if len(job.sampling.stop) > s.max_stop_sequences:
        raise BadRequest(f"at most {s.max_stop_sequences} stop sequences are allowed")
    for stop in job.sampling.stop:
        if not stop or len(stop) > s.max_stop_length:
            raise BadRequest(f"each stop sequence must be 1-{s.max_stop_length} characters")


async def resolve_adapter(services: Services, tenant: Tenant, ref: str | None) -> ResolvedAdapter | None:
    if ref is None:
        return None
    return await run_in_threadpool(services.registry.resolve, tenant.id, ref)


class Generation:
    """One request in flight: the events of the worker it landed on."""

    def __init__(self, services: Services, job: GenerationInput, adapter: ResolvedAdapter | None) -> None:
        self.services = services
        self.adapter = adapter
        self.request = GenerateRequest(
            request_id=uuid.uuid4().hex,
            prompt=job.prompt,
            messages=job.messages,
            adapter=None
            if adapter is None
            else AdapterRef(key=adapter.cache_key, weights_sha256=adapter.weights_sha256,
                            config_sha256=adapter.config_sha256),
            sampling=job.sampling,
        )
        # Picked now, so that "no worker ready" is a 503 before any response starts.
        self.slot = services.pool.pick(self.request.adapter.key if self.request.adapter else None)

    async def events(self) -> AsyncIterator[GenerateEvent]:
        """Worker events; an error event from the worker becomes the matching API error."""
        slot = self.slot
        slot.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            async for event in slot.client.generate(self.request):
                if event.error is not None:
                    raise _event_error(event)
                yield event
        finally:
            slot.in_flight -= 1
            metrics.IN_FLIGHT.dec()

    async def complete(self) -> Completion:
        parts: list[str] = []
        async with aclosing(self.events()) as events:
            async for event in events:
                parts.append(event.text)
                if event.finished:
                    assert event.usage is not None
                    metrics.record_tokens(event.usage.prompt_tokens, event.usage.completion_tokens)
                    return Completion("".join(parts), event.finish_reason or "stop",
                                      event.usage.prompt_tokens, event.usage.completion_tokens)
        raise WorkerUnavailable("the worker ended the stream without finishing the request")


def _event_error(event: GenerateEvent) -> Exception:
    message = event.error or "generation failed"
    if event.error_status == 400:
        return BadRequest(message)
    if event.error_status == 503:
        return WorkerUnavailable(message)
    return GenerationFailed(message)
