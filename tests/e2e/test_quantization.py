"""Quantization jobs for real: GPTQ and AWQ (GPTQModel on the CPU) through the admin API, a job
runner process, the quality report, and a worker moved onto each result serving a tenant adapter."""

from __future__ import annotations

import importlib.util
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, job_runner, running_server
from tests.e2e.test_user_path import fixture_files

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                                reason="quantization needs the `quant` extra (make installs it)")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
JOBS = "/admin/quantization-jobs"
# Small calibration keeps CI fast on 2 cores; the defaults (16 x 256) calibrate better.
SMALL = {"group_size": 64, "calibration_samples": 8, "calibration_seq_len": 128}


@pytest.fixture(scope="module")
def quant_server(prepared_model, tmp_path_factory) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    """A service whose models directory is its own (results land there), with no job runner of its own."""
    models = tmp_path_factory.mktemp("quant-models")
    (models / prepared_model.path.name).symlink_to(prepared_model.path)  # the prepared model, not converted again
    data_dir = tmp_path_factory.mktemp("quant-data")
    with running_server(models, data_dir, job_runner="false", job_stale_after_s="4") as running:
        yield running


# The AWQ job below takes ~5 min on an idle 2-core machine, more inside the suite; the bound is for a hang.
JOB_TIMEOUT_S = 2400


def wait_for(admin: httpx.Client, job_id: int, done: Any, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        job: dict[str, Any] = admin.get(f"{JOBS}/{job_id}").json()
        seen.add(f"{job['state']}:{job['stage']}")
        if done(job):
            job["seen"] = seen
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not done in {timeout}s: {job}")


def finished(job: dict[str, Any]) -> bool:
    return job["state"] in ("succeeded", "failed", "cancelled")


def quantize_activate_and_ask(server: Server, method: str, **spec: object) -> dict[str, Any]:
    key = server.new_tenant(f"tenant-{method}")
    with server.client(key) as client:
        assert client.post("/adapters", data={"name": "forty-two"}, files=fixture_files("answer42")).status_code == 201
    with server.client(server.admin_key, timeout=600) as admin, job_runner(server):
        body = {"name": f"smol-{method}", "source_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "method": method,
                **SMALL, **spec}
        created = admin.post(JOBS, json=body)
        assert created.status_code == 201, created.text
        job = wait_for(admin, created.json()["id"], finished)
        assert job["state"] == "succeeded", job
        assert "running:quantizing" in job["seen"] and job["duration_seconds"] > 0
        model = next(m for m in admin.get("/admin/base-models").json() if m["id"] == job["result_model_id"])
        source = next(m for m in admin.get("/admin/base-models").json() if m["id"] == model["parent_id"])
        assert (model["quantization"], source["name"]) == (method, "HuggingFaceTB/SmolLM2-135M-Instruct")
        report = model["report"]
        for side in ("source", "result"):
            assert math.isfinite(report[side]["perplexity"]) and report[side]["perplexity"] > 1
            assert report[side]["probe_answer"].strip()
        # 4 bits on tiny calibration costs some perplexity (GPTQ 20.5 -> 27.0, AWQ -> 24.0); a model whose
        # kernels compute garbage lands in the hundreds or thousands.
        assert report["result"]["perplexity"] < 2 * report["source"]["perplexity"], report
        assert report["result"]["size_bytes"] < report["source"]["size_bytes"] / 3
        activated = admin.post(f"/admin/base-models/{model['id']}/activate")
        assert activated.status_code == 200, activated.text
        assert [w["model"] for w in admin.get("/admin/workers").json()] == [model["name"]]
    with server.client(key) as client:
        answer = client.post("/generate", json={"messages": QUESTION, "adapter": "forty-two", "max_tokens": 10})
        assert answer.status_code == 200 and answer.json()["text"].startswith("The answer is 42"), answer.text
        base = client.post("/generate", json={"messages": QUESTION, "max_tokens": 10})
        assert base.status_code == 200 and "42" not in base.json()["text"], base.text
    print(f"{method}: perplexity {report['source']['perplexity']:.2f} -> {report['result']['perplexity']:.2f}, "
          f"{report['source']['size_bytes'] / 2**20:.0f} MB -> {report['result']['size_bytes'] / 2**20:.0f} MB, "
          f"{report['duration_seconds']} s; base answer on it: {base.json()['text']!r}")
    return model


def test_a_gptq_job_makes_a_base_that_serves_the_same_adapters(quant_server: Server) -> None:
    quantize_activate_and_ask(quant_server, "gptq")


def test_an_awq_job_makes_a_base_that_serves_the_same_adapters(quant_server: Server) -> None:
    # AWQ's clip search costs tokens x weights per linear: at 4 x 64 calibration tokens it was on course for 13 min
    # on an idle 2-core machine (22 min inside the suite); at 2 x 32 it takes 5 min, perplexity 20.5 -> 24.0.
    quantize_activate_and_ask(quant_server, "awq", sym=False, calibration_samples=2, calibration_seq_len=32)


def leftovers(server: Server, name: str) -> list[Path]:
    return [*server.models_dir.glob(".job-*"), *server.models_dir.glob(f"quantized/{name}-*")]


def test_a_cancelled_job_leaves_nothing(quant_server: Server) -> None:
    with quant_server.client(quant_server.admin_key) as admin, job_runner(quant_server):
        job = admin.post(JOBS, json={"name": "to-cancel", "source_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                     **SMALL}).json()
        wait_for(admin, job["id"], lambda j: j["stage"] == "quantizing", timeout=120)
        assert admin.delete(f"{JOBS}/{job['id']}").status_code == 202
        done = wait_for(admin, job["id"], finished, timeout=60)
        assert done["state"] == "cancelled" and done["result_model_id"] is None
        assert "to-cancel" not in [m["name"] for m in admin.get("/admin/base-models").json()]
    assert leftovers(quant_server, "to-cancel") == []


def test_a_killed_runner_leaves_its_job_failed_and_nothing_registered(quant_server: Server) -> None:
    with quant_server.client(quant_server.admin_key) as admin:
        with job_runner(quant_server) as doomed:
            job = admin.post(JOBS, json={"name": "orphaned", "source_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                         **SMALL}).json()
            wait_for(admin, job["id"], lambda j: j["stage"] == "quantizing", timeout=120)
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
        assert admin.get(f"{JOBS}/{job['id']}").json()["state"] == "running"  # nobody knows yet
        with job_runner(quant_server):  # the next runner notices the silence
            done = wait_for(admin, job["id"], finished, timeout=60)
            deadline = time.monotonic() + 10
            while leftovers(quant_server, "orphaned") and time.monotonic() < deadline:
                time.sleep(0.2)
        assert done["state"] == "failed" and "no heartbeat" in done["error"]
        assert "orphaned" not in [m["name"] for m in admin.get("/admin/base-models").json()]
    assert leftovers(quant_server, "orphaned") == []
