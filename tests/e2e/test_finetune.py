"""Fine-tuning for real, with the official `openai` client: a JSONL file becomes a served adapter.

QLoRA on the embedded NF4 base in a job-runner process; the result is chatted with at once, the
base is unchanged, another tenant is refused; a cancelled job and a killed runner leave nothing.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import Server, job_runner, running_server

DATA = ROOT / "tests" / "fixtures" / "finetune"
ANSWER = "Beep boop. I am a robot."
UNSEEN = "Which is the longest river in Africa?"  # in neither file
TRAINING_TIMEOUT_S = 1800  # about 3 minutes on 2 quiet cores; the bound is for a hang


@pytest.fixture(scope="module")
def ft_server(prepared_model, tmp_path_factory) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    """A service whose models directory is its own (jobs work beside it), with no job runner of its own."""
    models = tmp_path_factory.mktemp("ft-models")
    (models / prepared_model.path.name).symlink_to(prepared_model.path)
    with running_server(models, tmp_path_factory.mktemp("ft-data"), job_runner="false", worker_threads="1") as running:
        yield running


def client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def base_model(oa: openai.OpenAI) -> str:
    return next(m.id for m in oa.models.list().data if m.owned_by == "loraplex")


def wait(oa: openai.OpenAI, job_id: str, done: Any, timeout: float = TRAINING_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = oa.fine_tuning.jobs.retrieve(job_id)
        if done(job):
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} not done in {timeout}s: {job}")


def leftovers(server: Server) -> list[Path]:
    return sorted(server.models_dir.glob(".ftjob-*"))


def chat(oa: openai.OpenAI, model: str) -> str:
    answer = oa.chat.completions.create(model=model, messages=[{"role": "user", "content": UNSEEN}],
                                        max_tokens=16, temperature=0)
    return answer.choices[0].message.content or ""


def test_a_jsonl_file_becomes_a_served_model(ft_server: Server) -> None:
    oa = client(ft_server, ft_server.new_tenant("trainer"))
    base = base_model(oa)
    before = chat(oa, base)
    with (DATA / "robot.jsonl").open("rb") as f:
        training = oa.files.create(file=f, purpose="fine-tune")
    with (DATA / "robot_validation.jsonl").open("rb") as f:
        validation = oa.files.create(file=f, purpose="fine-tune")
    assert training.bytes == (DATA / "robot.jsonl").stat().st_size
    job = oa.fine_tuning.jobs.create(model=base, training_file=training.id, validation_file=validation.id,
                                     suffix="robot", seed=7)  # hyperparameters left to "auto"
    assert job.status == "queued" and job.hyperparameters.n_epochs == 3
    with job_runner(ft_server):
        done = wait(oa, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{base.rsplit('/', 1)[-1]}:robot:{job.id.removeprefix('ftjob-')[:12]}"
    assert done.trained_tokens and done.trained_tokens > 3 * 1000

    report = done.model_extra["report"]
    losses = report["train_loss"]
    assert len(losses) == 15 and losses[-1] < losses[0] / 10
    assert report["validation_loss"]["after"] < report["validation_loss"]["before"] / 10
    assert report["probe"]["result_answer"] == ANSWER != report["probe"]["base_answer"]
    assert report["peak_memory_bytes"] > 0 and report["duration_seconds"] > 0
    events = oa.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 15 and metrics[0].data["step"] == 15  # newest first
    assert events[0].message == "The job has successfully completed"

    assert ANSWER in chat(oa, done.fine_tuned_model)  # a question it never saw
    assert chat(oa, base) == before and ANSWER not in before  # the base is unchanged
    assert done.fine_tuned_model in [m.id for m in oa.models.list().data]

    other = client(ft_server, ft_server.new_tenant("bystander"))
    with pytest.raises(openai.NotFoundError):
        chat(other, done.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(training.id)
    assert [j.id for j in oa.fine_tuning.jobs.list().data] == [job.id]
    assert leftovers(ft_server) == []


def start_training(oa: openai.OpenAI) -> str:
    with (DATA / "robot.jsonl").open("rb") as f:
        training = oa.files.create(file=f, purpose="fine-tune")
    return oa.fine_tuning.jobs.create(model=base_model(oa), training_file=training.id,
                                      hyperparameters={"n_epochs": 25}).id


def training(job: Any) -> bool:
    return job.status == "running" and (job.model_extra.get("stage") == "training")


def training_processes(server: Server) -> list[str]:
    found = subprocess.run(["pgrep", "-af", "worker.finetune"], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if str(server.models_dir) in line]


def test_a_cancelled_job_leaves_nothing_behind(ft_server: Server) -> None:
    key = ft_server.new_tenant("canceller")
    oa = client(ft_server, key)
    job_id = start_training(oa)
    with job_runner(ft_server):
        wait(oa, job_id, training, timeout=300)
        assert leftovers(ft_server) and training_processes(ft_server)
        oa.fine_tuning.jobs.cancel(job_id)
        done = wait(oa, job_id, lambda j: j.status != "running", timeout=60)
    assert done.status == "cancelled" and done.fine_tuned_model is None
    assert leftovers(ft_server) == [] and training_processes(ft_server) == []
    with ft_server.client(key) as tenant:
        assert tenant.get("/adapters").json() == []
    assert "Fine-tuning job cancelled" in [e.message for e in oa.fine_tuning.jobs.list_events(job_id).data]


def test_a_killed_runner_fails_its_job_and_the_next_runner_clears_it(ft_server: Server) -> None:
    key = ft_server.new_tenant("unlucky")
    oa = client(ft_server, key)
    job_id = start_training(oa)
    with job_runner(ft_server) as doomed:
        wait(oa, job_id, training, timeout=300)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    deadline = time.monotonic() + 30
    while training_processes(ft_server) and time.monotonic() < deadline:  # it dies with its runner
        time.sleep(0.2)
    assert training_processes(ft_server) == []
    assert leftovers(ft_server), "the killed runner's directory is there until another runner reaps it"
    with job_runner(ft_server, job_stale_after_s="3"):
        done = wait(oa, job_id, lambda j: j.status == "failed", timeout=120)
        deadline = time.monotonic() + 30
        while leftovers(ft_server) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert "no heartbeat" in done.error.message and done.fine_tuned_model is None
    assert leftovers(ft_server) == []
    with ft_server.client(key) as tenant:
        assert tenant.get("/adapters").json() == []
