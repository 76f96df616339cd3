"""A worker moves onto another base model in its own process (a remote worker's activation)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.integration.conftest import Outcome, worker_request
from worker.config import WorkerConfig
from worker.engine import EngineClosed
from worker.runtime import WorkerRuntime

FRANCE = "What is the capital of France?"


def wait_ready(runtime: WorkerRuntime, model: str) -> None:
    deadline = time.monotonic() + 300
    while not (runtime.health().ready and runtime.health().model == model):
        assert runtime.error is None, runtime.error
        assert time.monotonic() < deadline, "the worker did not come up"
        time.sleep(0.1)


def ask(runtime: WorkerRuntime, question: str, **sampling: object) -> Outcome:
    assert runtime.loaded is not None
    request = worker_request(question, **sampling)
    outcome = Outcome()
    prepared = runtime.loaded.prompts.prepare(request)
    runtime.loaded.engine.submit(request, prepared.ids, outcome.sink, prepared.matcher)
    return outcome


@pytest.fixture(scope="module")
def runtime(prepared_model) -> Iterator[WorkerRuntime]:  # type: ignore[no-untyped-def]
    config = WorkerConfig(model_path=prepared_model.path, model_name=prepared_model.name, blob_url="/nonexistent",
                          torch_threads=2, max_batch_size=4)
    runtime = WorkerRuntime(config)
    runtime.start()
    wait_ready(runtime, prepared_model.name)
    yield runtime
    runtime.stop()


def test_a_reload_fails_what_runs_with_a_503_and_serves_on_the_new_base(runtime: WorkerRuntime,
                                                                       prepared_model) -> None:  # type: ignore[no-untyped-def]
    long = ask(runtime, "Write a long story about a dragon.", max_tokens=400, ignore_eos=True)
    long.first_event_at()
    reloader = threading.Thread(target=runtime.reload, args=(str(prepared_model.path), "moved", 0.0))
    reloader.start()
    deadline = time.monotonic() + 10
    while runtime.reloading is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not runtime.health().ready  # from the moment it is asked to move, not only once the old model is gone
    final = long.final
    assert final.error_status == 503 and "moved to base model 'moved'" in (final.error or "")
    reloader.join(300)
    wait_ready(runtime, "moved")
    answer = ask(runtime, FRANCE, max_tokens=12)
    assert answer.final.error is None and "Paris" in answer.text
    assert runtime.liveness_problem() is None and runtime.reloading is None


def test_a_second_reload_while_one_runs_is_refused(runtime: WorkerRuntime, prepared_model) -> None:  # type: ignore[no-untyped-def]
    results: list[bool] = []
    first = threading.Thread(target=lambda: results.append(runtime.reload(str(prepared_model.path), "again", 0.0)))
    first.start()
    deadline = time.monotonic() + 10
    while runtime.reloading is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert runtime.reload(str(prepared_model.path), "third", 0.0) is False
    first.join(300)
    assert results == [True]
    wait_ready(runtime, "again")


def test_a_request_admitted_while_the_move_starts_is_drained_not_failed(runtime: WorkerRuntime,
                                                                        prepared_model) -> None:  # type: ignore[no-untyped-def]
    """The worker's /generate counts a request from its reloading check until the engine holds it (the
    prompt is tokenized in between): a move asked for meanwhile drains it like a running one."""
    assert runtime.begin_admission() is None  # past the check, its prompt being tokenized
    reloader = threading.Thread(target=runtime.reload, args=(str(prepared_model.path), "drained", 30.0))
    try:
        reloader.start()
        time.sleep(0.5)
        assert reloader.is_alive() and runtime.loaded is not None and runtime.liveness_problem() is None
        assert runtime.begin_admission() is not None  # a request arriving now is refused
        admitted = ask(runtime, FRANCE, max_tokens=12)  # the engine takes it, as /generate does next
    finally:
        runtime.end_admission()
    assert admitted.final.error is None and "Paris" in admitted.text
    reloader.join(300)
    wait_ready(runtime, "drained")


def test_a_request_still_admitting_when_the_drain_runs_out_is_refused_not_lost(runtime: WorkerRuntime,
                                                                                prepared_model) -> None:  # type: ignore[no-untyped-def]
    """A prompt whose tokenization outlasts the move's drain reaches an engine that has stopped: it gets
    a 503 to retry elsewhere, where it once sat in a dead engine's queue with its client waiting forever."""
    old = runtime.loaded
    assert old is not None and runtime.begin_admission() is None  # past the check, its prompt being tokenized
    try:
        reloader = threading.Thread(target=runtime.reload, args=(str(prepared_model.path), "short drain", 0.2))
        reloader.start()
        deadline = time.monotonic() + 60
        while old.engine.closed is None and time.monotonic() < deadline:
            time.sleep(0.01)
        request = worker_request(FRANCE, max_tokens=12)
        outcome = Outcome()
        with pytest.raises(EngineClosed, match="moved to base model 'short drain'"):
            old.engine.submit(request, old.prompts.prepare(request).ids, outcome.sink)
    finally:
        runtime.end_admission()
    reloader.join(300)
    wait_ready(runtime, "short drain")
    assert ask(runtime, FRANCE, max_tokens=12).final.error is None
