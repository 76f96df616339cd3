"""The generation service the three generation routes call: admit, pick a worker, relay its
events as one JSON answer or as an SSE stream, and account for the request once it ends.

Routes only parse, call `start`, and shape the answer (`SseFormat` for streams).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Protocol

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse

from adapters.models import Tenant
from adapters.registry import AdapterNotFound, ResolvedAdapter
from app import metrics
from app.deps import Services
from app.errors import ApiError, BadRequest, NotFound, WorkerUnavailable, as_api_error, worker_error
from app.quotas import QuotaLease, effective_limits
from app.workers.pool import WorkerSlot
from worker.grammar_spec import GrammarError, grammar_of
from worker.protocol import (
    AdapterRef,
    ChatMessage,
    GenerateEvent,
    GenerateRequest,
    PromptLogprob,
    SamplingParams,
    TokenLogprob,
    Usage,
)


@dataclass(frozen=True)
class GenerationInput:
    prompt: str | None
    messages: list[ChatMessage] | None
    adapter: str | None
    sampling: SamplingParams


@dataclass
class Choice:
    """One of a request's n answers."""

    index: int
    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # when asked: every generated token's
    cumulative_logprob: float | None = None  # when a score was asked (best_of)
    prompt_logprobs: list[PromptLogprob] | None = None  # when asked (echo): every prompt token's

    @property
    def mean_logprob(self) -> float:
        return (self.cumulative_logprob or 0.0) / max(1, self.completion_tokens)


@dataclass
class Completion:
    choices: list[Choice]  # by index
    prompt_tokens: int  # once: the choices share the prompt
    completion_tokens: int  # of every choice generated, returned or not

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    def best(self, n: int) -> list[Choice]:
        """The n choices with the highest log probability per token (OpenAI's best_of), numbered anew."""
        ranked = sorted(self.choices, key=lambda c: c.mean_logprob, reverse=True)[:n]
        return [replace(c, index=i) for i, c in enumerate(ranked)]


def check_limits(services: Services, job: GenerationInput) -> None:
    """Refuse input over the configured limits, naming the limit."""
    s = services.settings
    if (job.prompt is None) == (job.messages is None):
        raise BadRequest("give exactly one of 'prompt' or 'messages'")
    if job.messages is not None and not job.messages:
        raise BadRequest("'messages' must not be empty")
    if len(job.messages or []) > s.max_messages:
        raise BadRequest(f"'messages' has {len(job.messages or [])} messages; the limit is {s.max_messages} "
                         "(max_messages)")
    chars = len(job.prompt or "") + sum(len(m.role) + len(m.content) for m in job.messages or [])
    if chars > s.max_prompt_chars:
        raise BadRequest(f"the prompt has {chars} characters; the limit is {s.max_prompt_chars} (max_prompt_chars)")
    if job.sampling.max_tokens > s.max_tokens_limit:
        raise BadRequest(
            f"max_tokens {job.sampling.max_tokens} is above the limit of {s.max_tokens_limit} (max_tokens_limit)"
        )
    if job.sampling.n > s.max_batch_size:
        raise BadRequest(f"n={job.sampling.n} choices run as {job.sampling.n} batch rows at once; a worker's "
                         f"batch has {s.max_batch_size} (max_batch_size)")
    if len(job.sampling.stop) > s.max_stop_sequences:
        raise BadRequest(f"at most {s.max_stop_sequences} stop sequences are allowed (max_stop_sequences)")
    for stop in job.sampling.stop:
        if not stop or len(stop) > s.max_stop_length:
            raise BadRequest(f"each stop sequence must be 1-{s.max_stop_length} characters (max_stop_length)")


async def resolve_adapter(services: Services, tenant: Tenant, ref: str | None) -> ResolvedAdapter | None:
    if ref is None:
        return None
    return await run_in_threadpool(services.registry.resolve, tenant.id, ref)


log = logging.getLogger(__name__)

MAX_RETRIES = 1  # another worker after a worker failure, never after the worker refused the request itself
WORKER_HEADER = "X-Loraplex-Worker"  # which worker answered: makes adapter-affinity routing visible


async def start(services: Services, tenant: Tenant, route: str, job: GenerationInput,
                adapter: ResolvedAdapter | None) -> Generation:
    """Check the limits and admit the request: 400, 429 and 503 come here, before any response starts."""
    check_limits(services, job)
    constraint = job.sampling.constraint
    if constraint is not None:  # a schema the grammar compiler refuses: 400 now, not in a stream (workers check again)
        try:
            await run_in_threadpool(grammar_of, constraint)
        except GrammarError as exc:
            raise BadRequest(str(exc)) from None
    return Generation(services, tenant, route, job, adapter)


class Generation:
    """One request in flight: the events of the worker it landed on.

    It holds a lease on the tenant's quota from admission until `finish` (an `async with` block
    around the work, or a streaming response's background task): what was generated is charged
    and the slot freed, however the request ended.
    """

    def __init__(
        self, services: Services, tenant: Tenant, route: str, job: GenerationInput, adapter: ResolvedAdapter | None
    ) -> None:
        self.services = services
        self.route = route
        self.tenant_id = tenant.id
        self.tenant_label = services.tenant_labels.label(tenant.name)
        self.started = time.monotonic()
        self._last_text: float | None = None
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
            tenant=str(tenant.id),  # the worker shares its engine fairly between tenants
        )
        # Picked and admitted now, so that 503 and 429 come before any response starts.
        self.slot = services.pool.pick(self.request.adapter.key if self.request.adapter else None)
        self._tried: list[WorkerSlot] = []
        self._generated: dict[int, int] = {}  # choice -> tokens generated so far, in the current attempt
        self.lease = QuotaLease(services.quotas, tenant.id, effective_limits(tenant, services.settings))
        self._finished = False

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *_: object) -> None:
        self.finish()

    def finish(self) -> None:
        """Settle the quota lease and record the request's latency; once, however it ended."""
        if self._finished:
            return
        self._finished = True
        self.lease.settle()
        metrics.REQUEST_LATENCY.labels(self.route).observe(time.monotonic() - self.started)

    async def events(self) -> AsyncGenerator[GenerateEvent, None]:
        """Worker events as they come; fails over to another worker while nothing was produced."""
        try:
            while True:
                produced = False
                try:
                    async with aclosing(self._attempt()) as attempt:
                        async for event in attempt:
                            produced = True
                            yield event
                    return
                except WorkerUnavailable:
                    if produced:
                        raise  # the client has part of an answer: a retryable error, not a silent restart
                    await self._fail_over()
        finally:
            self.finish()

    async def complete(self, request: Request) -> Completion:
        """The whole answer, or an abort (in the worker too) the moment the client goes away.

        Nothing reaches the client before the end, so any worker failure fails over.
        """
        async with self:
            work = asyncio.ensure_future(self._complete())
            gone = asyncio.ensure_future(_disconnected(request))
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not work.done():
                    work.cancel()  # closes the worker stream, which aborts the row
            if work.cancelled():
                raise asyncio.CancelledError
            return work.result()

    async def _complete(self) -> Completion:
        while True:
            try:
                return await self._complete_once()
            except WorkerUnavailable:
                await self._fail_over()

    def sse(self, fmt: SseFormat) -> StreamingResponse:
        """The events as Server-Sent Events in `fmt`'s shapes; the lease ends with the stream, or
        in the response's background task if the stream never started (a client gone at once)."""
        return StreamingResponse(self._sse(fmt), media_type="text/event-stream",
                                 headers={WORKER_HEADER: self.slot.client.name}, background=BackgroundTask(self.finish))

    async def _sse(self, fmt: SseFormat) -> AsyncIterator[bytes]:
        async with self:
            try:
                for payload in fmt.opening():
                    yield _frame(payload)
                async with aclosing(self.events()) as events:
                    async for event in events:
                        for payload in fmt.on_event(event):
                            yield _frame(payload)
            except Exception as exc:  # after the 200 the only way to report is in-band, never a cut socket
                yield _frame(fmt.on_error(as_api_error(exc)))
            if fmt.closing:
                yield fmt.closing

    async def _complete_once(self) -> Completion:
        n = self.request.sampling.n
        parts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        ended: dict[int, GenerateEvent] = {}
        prompt_logprobs: dict[int, list[PromptLogprob]] = {}
        async with aclosing(self._attempt()) as attempt:
            async for event in attempt:
                if event.prompt_logprobs is not None:
                    prompt_logprobs[event.index] = event.prompt_logprobs
                parts[event.index].append(event.text)
                logprobs[event.index] += event.logprobs or []
                if event.finished:
                    ended[event.index] = event
                if len(ended) == n:
                    return self._completion(parts, logprobs, ended, prompt_logprobs)
        raise WorkerUnavailable("the worker ended the stream without finishing the request")

    def _completion(self, parts: list[list[str]], logprobs: list[list[TokenLogprob]],
                    ended: dict[int, GenerateEvent], prompt_logprobs: dict[int, list[PromptLogprob]]) -> Completion:
        asked = self.request.sampling.logprobs is not None
        choices = []
        for i, event in sorted(ended.items()):
            assert event.usage is not None
            choices.append(Choice(i, "".join(parts[i]), event.finish_reason or "stop", event.usage.completion_tokens,
                                  logprobs[i] if asked else None, event.cumulative_logprob, prompt_logprobs.get(i)))
        prompt_tokens = ended[0].usage.prompt_tokens if ended[0].usage is not None else 0
        return Completion(choices, prompt_tokens, sum(c.completion_tokens for c in choices))

    async def _attempt(self) -> AsyncGenerator[GenerateEvent, None]:
        """One try on the current worker; an error event from it becomes the matching API error."""
        slot = self.slot
        self._generated = {}  # this attempt's counts only: a failed-over attempt is not charged twice
        slot.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            async for event in slot.client.generate(self.request):
                if event.error is not None:
                    self._count(event, event.usage)
                    await self._raise_if_deleted()
                    raise worker_error(event.error_status or 500, event.error or "generation failed",
                                       self.request.request_id, slot.client.name)
                self._observe(event)
                yield event
        finally:
            slot.in_flight -= 1
            metrics.IN_FLIGHT.dec()

    async def _raise_if_deleted(self) -> None:
        """A version deleted after admission but before the worker loaded it is a 404, not a failure."""
        adapter = self.adapter
        if adapter is None:
            return
        pinned = f"{adapter.name}@{adapter.version}"
        try:
            await run_in_threadpool(self.services.registry.resolve, self.tenant_id, pinned)
        except AdapterNotFound:
            raise NotFound(f"adapter {pinned!r} was deleted while the request waited") from None

    def _observe(self, event: GenerateEvent) -> None:
        now = time.monotonic()
        if event.text:
            if self._last_text is None:
                metrics.TIME_TO_FIRST_TOKEN.observe(now - self.started)
            else:
                metrics.INTER_TOKEN_LATENCY.observe(now - self._last_text)
            self._last_text = now
        self._count(event, event.usage or event.progress)
        if event.finished and event.usage is not None:
            prompt = event.usage.prompt_tokens if event.index == 0 else 0  # n choices share one prompt
            metrics.record_tokens(prompt, event.usage.completion_tokens)
            metrics.TENANT_TOKENS.labels(self.tenant_label, "prompt").inc(prompt)
            metrics.TENANT_TOKENS.labels(self.tenant_label, "completion").inc(event.usage.completion_tokens)
            if event.index == 0:
                metrics.TENANT_LATENCY.labels(self.tenant_label).observe(now - self.started)
                if event.queue_seconds is not None:
                    metrics.QUEUE_TIME.observe(event.queue_seconds)

    def _count(self, event: GenerateEvent, usage: Usage | None) -> None:
        """The lease's tokens: the worker's running counts of this attempt, the prompt once and every choice."""
        if usage is not None:
            self._generated[event.index] = usage.completion_tokens
            self.lease.tokens = usage.prompt_tokens + sum(self._generated.values())

    async def _fail_over(self) -> None:
        """Move to another ready worker once, or raise 503.

        Once only: a request that kills or hangs every worker it reaches (a poison pill) must not
        take the whole fleet down one worker at a time.
        """
        self._tried.append(self.slot)
        failed = self.slot.client.name
        if len(self._tried) > MAX_RETRIES:
            raise WorkerUnavailable(f"the request failed on {len(self._tried)} workers (last: {failed}); "
                                    "it is not retried further")
        self.slot = await self.services.pool.pick_fresh(self.request.adapter.key if self.request.adapter else None,
                                                        exclude=self._tried)
        metrics.RETRIES.inc()
        log.warning("request %s: worker %s failed, retrying on %s", self.request.request_id, failed,
                    self.slot.client.name)


class SseFormat(Protocol):
    """How a route shapes a stream: payloads to open with, per event, on an error, and a last line."""

    closing: bytes

    def opening(self) -> list[dict[str, Any]]: ...

    def on_event(self, event: GenerateEvent) -> list[dict[str, Any]]: ...

    def on_error(self, err: ApiError) -> dict[str, Any]: ...


def _frame(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away: the server's next message after the body is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
