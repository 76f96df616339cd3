"""An in-process worker for unit tests of the gateway (no model)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from app.errors import WorkerUnavailable
from worker.protocol import (
    GenerateEvent,
    GenerateRequest,
    PromptLogprob,
    TokenLogprob,
    TopLogprob,
    Usage,
    WorkerHealth,
)


class FakeWorkerClient:
    """Echoes the prompt word by word, tagged with the adapter key, honouring max_tokens."""

    def __init__(self, name: str = "fake-0") -> None:
        self.name = name
        self.base_url = f"fake://{name}"
        self.requests: list[GenerateRequest] = []
        self.evicted: list[str] = []
        self.ready = True
        self.fail_after: int | None = None  # die after this many events (0: before producing anything)
        self.on_request: Callable[[GenerateRequest], str | None] | None = None  # a returned string fails it (500)
        self.model = "fake"  # the base model it serves; `reload` moves it
        self.reloads: list[tuple[str, str]] = []
        self.cannot_load: set[str] = set()  # base models it fails to come up on

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateEvent]:
        self.requests.append(request)
        failure = self.on_request(request) if self.on_request is not None else None
        if failure is not None:
            yield GenerateEvent(request_id=request.request_id, finished=True, error=failure, error_status=500)
            return
        if self.fail_after == 0:
            raise WorkerUnavailable(f"worker {self.name} is unreachable or died mid-request")
        text = request.prompt if request.prompt is not None else request.messages[-1].content  # type: ignore[index]
        words = text.split()
        if request.adapter is not None:
            words.insert(0, f"[{request.adapter.key}]")
        n = min(len(words), request.sampling.max_tokens)
        choices = range(request.sampling.n)  # choice c > 0 answers "#c" first; their events interleave
        unsent = set(choices) if request.sampling.prompt_logprobs is not None else set()

        def prompt_logprobs(c: int) -> list[PromptLogprob] | None:  # each choice's first event
            if c not in unsent:
                return None
            unsent.discard(c)
            tokens = [w if k == 0 else " " + w for k, w in enumerate(words)]  # they make up the prompt
            return [PromptLogprob(token=t, logprob=None if k == 0 else -0.25, bytes=list(t.encode()))
                    for k, t in enumerate(tokens)]

        for i in range(n):
            if self.fail_after is not None and i >= self.fail_after:
                raise WorkerUnavailable(f"worker {self.name} is unreachable or died mid-request")
            progress = Usage(prompt_tokens=len(words), completion_tokens=i + 1)
            for c in choices:
                word = f"#{c}" if c and i == 0 else words[i]
                yield GenerateEvent(request_id=request.request_id, index=c, text=word + " ", progress=progress,
                                    logprobs=_fake_logprobs(word + " ", request.sampling.logprobs),
                                    prompt_logprobs=prompt_logprobs(c))
        for c in choices:
            yield GenerateEvent(
                request_id=request.request_id,
                index=c,
                finished=True,
                finish_reason="length" if n < len(words) else "stop",
                usage=Usage(prompt_tokens=len(words), completion_tokens=n),
                # choice 1 is the most likely, then 0 and 2, and so on
                cumulative_logprob=-abs(c - 1) - 0.5 * n if request.sampling.score else None,
                prompt_logprobs=prompt_logprobs(c),
            )

    async def evict(self, key: str) -> None:
        self.evicted.append(key)

    async def reload(self, model_path: str, model_name: str, drain_s: float) -> None:
        self.reloads.append((model_path, model_name))
        self.model = model_name
        self.ready = model_name not in self.cannot_load  # it never becomes ready there

    async def health(self) -> WorkerHealth:
        return WorkerHealth(ready=self.ready, model=self.model)

    async def metrics(self) -> str:
        if not self.ready:
            raise WorkerUnavailable(f"worker {self.name} is unreachable")
        return (
            "# HELP loraplex_worker_requests_total Generate requests accepted by this worker\n"
            "# TYPE loraplex_worker_requests_total counter\n"
            f"loraplex_worker_requests_total {len(self.requests)}.0\n"
            "# HELP loraplex_worker_memory_bytes Memory by kind\n"
            "# TYPE loraplex_worker_memory_bytes gauge\n"
            'loraplex_worker_memory_bytes{kind="rss"} 1.0e+06\n'
        )

    async def close(self) -> None:
        pass


def _fake_logprobs(token: str, width: int | None) -> list[TokenLogprob] | None:
    """One token per word, log probability -0.5, alternatives "alt0".."altN" below it."""
    if width is None:
        return None
    top = [TopLogprob(token=f"alt{k}", logprob=-1.0 - k, bytes=list(f"alt{k}".encode())) for k in range(width)]
    return [TokenLogprob(token=token, logprob=-0.5, bytes=list(token.encode()), top=top)]
