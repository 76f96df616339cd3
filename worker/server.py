"""The worker's internal HTTP API: generate (NDJSON stream; closing it aborts), evict, health, metrics.

The event loop only moves messages: tokens are made on the engine thread and handed
over through an asyncio queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker import metrics
from worker.auth import TokenGate
from worker.engine import EngineClosed, QueueFull
from worker.prompts import PromptError
from worker.protocol import EvictRequest, GenerateEvent, GenerateRequest, ReloadRequest, WorkerHealth
from worker.runtime import WorkerRuntime


def build_worker_app(runtime: WorkerRuntime, token: str | None = None) -> FastAPI:
    """The worker's API; with a token, every route but the probes and /metrics requires it (worker.auth)."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        yield
        runtime.stop()

    app = FastAPI(title="loraplex worker", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_generation_routes(app, runtime)
    _add_control_routes(app, runtime)
    if token is not None:
        app.add_middleware(TokenGate, token=token)
    return app


def _add_generation_routes(app: FastAPI, runtime: WorkerRuntime) -> None:
    @app.post("/generate")
    async def generate(body: GenerateRequest) -> Response:
        loaded = runtime.loaded
        if loaded is None:
            return _error(503, "the worker is still loading its base model")
        problem = runtime.liveness_problem()
        if problem is not None:
            return _error(503, f"the worker cannot serve: {problem}")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerateEvent] = asyncio.Queue()

        def sink(event: GenerateEvent) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        # A move that starts while the prompt is tokenized waits for it, not only for what the engine holds.
        moving = runtime.begin_admission()
        if moving is not None:
            return _error(503, moving)
        try:
            prepared = await loop.run_in_executor(runtime.prompt_thread, loaded.prompts.prepare, body)
            loaded.engine.submit(body, prepared.ids, sink, prepared.matcher)
        except PromptError as exc:
            return _error(400, str(exc))
        except (QueueFull, EngineClosed) as exc:  # the gateway sends it to another worker
            return _error(503, str(exc))
        finally:
            runtime.end_admission()
        metrics.REQUESTS.inc()
        stream = _ndjson(events, lambda: loaded.engine.abort(body.request_id), runtime, body.sampling.n)
        return StreamingResponse(stream, media_type="application/x-ndjson")


async def _ndjson(
    events: asyncio.Queue[GenerateEvent], abort: Callable[[], None], runtime: WorkerRuntime, choices: int
) -> AsyncIterator[bytes]:
    """Events as NDJSON lines until every choice has finished, or one failed (the request failed);
    a blank line every keepalive_s while the engine is live.

    The keep-alive is what lets the gateway tell a request that is waiting its turn from one
    stuck in a hung engine: it stops as soon as the engine stops making steps.
    """
    finished, failed = 0, False
    try:
        while finished < choices and not failed:
            try:
                event = await asyncio.wait_for(events.get(), timeout=runtime.config.keepalive_s)
            except TimeoutError:
                if runtime.liveness_problem() is None:
                    yield b"\n"
                continue
            finished += event.finished
            failed = event.error is not None
            yield event.model_dump_json(exclude_none=True).encode() + b"\n"
    finally:
        if finished < choices:  # the gateway went away, or one choice failed: free the other rows now
            abort()


def _add_control_routes(app: FastAPI, runtime: WorkerRuntime) -> None:
    @app.get("/health", response_model=WorkerHealth)
    async def health() -> WorkerHealth:
        return runtime.health()

    @app.get("/health/live")
    async def live() -> JSONResponse:
        """200 while loading or serving; 503 once the engine died or stalled (a liveness probe restarts it)."""
        problem = runtime.liveness_problem()
        return JSONResponse({"live": problem is None, "error": problem}, status_code=200 if problem is None else 503)

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        """200 only while the worker takes requests (a readiness probe)."""
        state = runtime.health()
        return JSONResponse({"ready": state.ready, "error": state.error}, status_code=200 if state.ready else 503)

    @app.post("/adapters/evict")
    async def evict(body: EvictRequest) -> dict[str, bool]:
        if runtime.loaded is not None:
            runtime.loaded.adapters.evict(body.key)
        return {"ok": True}

    @app.post("/reload", status_code=202)
    async def reload(body: ReloadRequest) -> JSONResponse:
        """Move onto another base model (the gateway's activation); poll /health for the new model, ready."""
        if runtime.reloading is not None:
            return _error(409, f"already moving to base model {runtime.reloading!r}")
        runtime.reloading = body.model_name  # refuse new requests from now, not from when the thread starts
        asyncio.get_running_loop().run_in_executor(
            None, runtime.reload, body.model_path, body.model_name, body.drain_s)
        return JSONResponse({"reloading": body.model_name}, status_code=202)

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.observe(runtime)
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)


def _error(status: int, message: str) -> JSONResponse:
    kind = "worker_unavailable" if status == 503 else "worker_error"
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)
