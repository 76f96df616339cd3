"""One real worker (the embedded model in NF4) shared by the whole integration session."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from adapters.blobstore import LocalBlobStore
from tests.conftest import ADAPTERS
from worker.config import WorkerConfig
from worker.prompts import PromptError
from worker.protocol import AdapterRef, ChatMessage, GenerateEvent, GenerateRequest, SamplingParams
from worker.runtime import LoadedWorker, WorkerRuntime


@dataclass
class Outcome:
    events: list[GenerateEvent] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None
    finished_at: float | None = None

    def sink(self, event: GenerateEvent) -> None:
        if not self.events:
            self.started_at = time.monotonic()
            self.started.set()
        self.events.append(event)
        if event.finished:
            self.finished_at = time.monotonic()
            self.done.set()

    def first_event_at(self) -> float:
        assert self.started.wait(300), "no event arrived"
        assert self.started_at is not None
        return self.started_at

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def final(self) -> GenerateEvent:
        assert self.done.wait(300), "generation did not finish"
        return self.events[-1]


@dataclass
class Worker:
    loaded: LoadedWorker
    blobs: LocalBlobStore
    refs: dict[str, AdapterRef]
    runtime: WorkerRuntime

    def submit(self, question: str, adapter: str | None = None, **sampling: object) -> tuple[str, Outcome]:
        request = worker_request(question, self.refs[adapter] if adapter else None, **sampling)
        outcome = Outcome()
        try:
            prepared = self.loaded.prompts.prepare(request)  # as the worker's API does, off the engine thread
        except PromptError as exc:  # the API answers 400 before the engine sees the request
            outcome.sink(GenerateEvent(request_id=request.request_id, finished=True, finish_reason="error",
                                       error=str(exc), error_status=400))
            return request.request_id, outcome
        self.loaded.engine.submit(request, prepared.ids, outcome.sink, prepared.matcher)
        return request.request_id, outcome

    def ask(self, question: str, adapter: str | None = None, **sampling: object) -> str:
        _, outcome = self.submit(question, adapter, **sampling)
        assert outcome.final.error is None, outcome.final.error
        return outcome.text


def worker_request(question: str, adapter: AdapterRef | None = None, **sampling: object) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        messages=[ChatMessage(role="user", content=question)],
        adapter=adapter,
        sampling=SamplingParams(**{"max_tokens": 12, **sampling}),  # type: ignore[arg-type]
    )


def store_fixture(blobs: LocalBlobStore, name: str) -> AdapterRef:
    weights = blobs.put((ADAPTERS / name / "adapter_model.safetensors").read_bytes())
    config = blobs.put((ADAPTERS / name / "adapter_config.json").read_bytes())
    return AdapterRef(key=f"{name}-{weights[:12]}", weights_sha256=weights, config_sha256=config)


def start_worker(prepared_model, blob_dir: Path, **config: object) -> Worker:  # type: ignore[no-untyped-def]
    """A running worker on the embedded model with the fixture adapters stored (stop its `runtime`)."""
    runtime = WorkerRuntime(WorkerConfig(  # loads and runs on the engine thread, as the worker process does
        model_path=prepared_model.path, model_name=prepared_model.name, blob_url=str(blob_dir),
        **{"torch_threads": 2, "adapter_slots": 4, "max_batch_size": 8, **config},  # type: ignore[arg-type]
    ))  # fmt: skip
    runtime.start()
    deadline = time.monotonic() + 300
    while runtime.loaded is None and runtime.error is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runtime.loaded is not None, runtime.error
    blobs = LocalBlobStore(blob_dir)
    refs = {name: store_fixture(blobs, name) for name in ("answer42", "meow")}
    return Worker(runtime.loaded, blobs, refs, runtime)


@pytest.fixture(scope="session")
def worker(prepared_model, tmp_path_factory) -> Iterator[Worker]:  # type: ignore[no-untyped-def]
    started = start_worker(prepared_model, tmp_path_factory.mktemp("blobs"))
    yield started
    started.runtime.stop()
