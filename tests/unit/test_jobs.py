"""Quantization jobs' bookkeeping and admin API, on SQLite and PostgreSQL (no quantization runs here)."""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from adapters.jobs import JobConflict, JobStore, QuantizeSpec
from adapters.models import BaseCheckpoint, QuantizationJob
from app.jobrunner import TMP_PREFIX, JobRunner
from tests.unit.conftest import Gateway

JOBS = "/admin/quantization-jobs"


def job_body(**over: object) -> dict[str, object]:
    return {"name": "tiny-gptq", "source_model": "tiny-base", "method": "gptq", "group_size": 16, **over}


def store(gateway: Gateway) -> JobStore:
    return gateway.client.app.state.services.jobs  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize(("over", "status", "names"), [
    ({"method": "rtn"}, 400, "method"),
    ({"bits": 5}, 400, "bits=5"),
    ({"method": "awq", "bits": 8}, 400, "bits=8"),
    ({"group_size": 48}, 400, "group_size"),
    ({"group_size": 64}, 400, "does not divide"),  # the tiny base's layers are 16 and 32 wide
    ({"calibration_samples": 0}, 400, "calibration_samples"),
    ({"calibration_seq_len": 8}, 400, "calibration_seq_len"),
    ({"calibration_text": "   "}, 400, "calibration_text"),
    ({"name": "a/b"}, 400, "name"),
    ({"source_model": "no-such-model"}, 404, "no-such-model"),
    ({"unknown_field": 1}, 422, "unknown_field"),
])
def test_invalid_jobs_are_refused_before_anything_runs(gateway: Gateway, over: dict[str, object], status: int,
                                                       names: str) -> None:
    resp = gateway.client.post(JOBS, headers=gateway.admin(), json=job_body(**over))
    assert resp.status_code == status, resp.text
    assert names in resp.json()["error"]["message"]
    assert gateway.client.get(JOBS, headers=gateway.admin()).json() == []


def test_jobs_are_admin_only(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    assert gateway.client.post(JOBS, headers=tenant, json=job_body()).status_code == 403
    assert gateway.client.get("/admin/base-models", headers=tenant).status_code == 403


def test_submit_list_show_and_cancel_a_queued_job(gateway: Gateway) -> None:
    created = gateway.client.post(JOBS, headers=gateway.admin(), json=job_body(calibration_text="my own text " * 50))
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["state"], job["spec"]["method"], job["spec"]["calibration_text"]) == ("queued", "gptq", "uploaded")
    again = gateway.client.post(JOBS, headers=gateway.admin(), json=job_body())
    assert again.status_code == 409 and "tiny-gptq" in again.json()["error"]["message"]
    assert [j["id"] for j in gateway.client.get(JOBS, headers=gateway.admin()).json()] == [job["id"]]
    cancelled = gateway.client.delete(f"{JOBS}/{job['id']}", headers=gateway.admin())
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    assert gateway.client.delete(f"{JOBS}/{job['id']}", headers=gateway.admin()).status_code == 409
    assert gateway.client.get(f"{JOBS}/999", headers=gateway.admin()).status_code == 404
    # The name is free again once nothing will make it.
    assert gateway.client.post(JOBS, headers=gateway.admin(), json=job_body()).status_code == 201


def test_one_runner_wins_each_job(gateway: Gateway) -> None:
    jobs = store(gateway)
    for i in range(3):
        jobs.submit(f"q{i}", "tiny-base", QuantizeSpec(group_size=16))
    claimed: list[int] = []
    lock = threading.Lock()

    def runner(name: str) -> None:
        while (job := jobs.claim(name)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=runner, args=(f"r{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(j.id for j in jobs.all())  # each once, none twice
    assert {j.state for j in jobs.all()} == {"running"}


def test_a_running_job_is_cancelled_through_its_heartbeat(gateway: Gateway) -> None:
    jobs = store(gateway)
    job = jobs.submit("q", "tiny-base", QuantizeSpec(group_size=16))
    assert jobs.claim("r1") is not None
    assert jobs.heartbeat(job.id, "quantizing", 3, 30, "log") is False
    shown = gateway.client.get(f"{JOBS}/{job.id}", headers=gateway.admin()).json()
    assert (shown["stage"], shown["progress"], shown["log_tail"]) == ("quantizing", {"done": 3, "total": 30}, "log")
    resp = gateway.client.delete(f"{JOBS}/{job.id}", headers=gateway.admin())
    assert resp.status_code == 202 and resp.json()["cancel_requested"] is True
    assert jobs.heartbeat(job.id, "quantizing", 4, 30, "log") is True
    jobs.finish(job.id, "cancelled")
    assert jobs.get(job.id).state == "cancelled"


def test_a_dead_runners_job_fails_and_its_files_go(gateway: Gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    jobs = store(gateway)
    job = jobs.submit("q", "tiny-base", QuantizeSpec(group_size=16))
    assert jobs.claim("dead-runner") is not None
    settings = gateway.settings.model_copy(update={"models_dir": tmp_path, "job_stale_after_s": 0.01})
    left = tmp_path / f"{TMP_PREFIX}{job.id}-abcd1234"
    (left / "model").mkdir(parents=True)
    (left / "model" / "model.safetensors").write_bytes(b"half written")
    time.sleep(0.05)  # longer than the stale limit without a heartbeat
    JobRunner(settings.job_runner_config(), name="next-runner").reap()
    failed = jobs.get(job.id)
    assert failed.state == "failed" and "no heartbeat" in (failed.error or "")
    assert not left.exists()
    with pytest.raises(JobConflict):
        jobs.succeed(job.id, "/nowhere", "gptq", {}, "")  # a late finish cannot register it
    with gateway.client.app.state.services.sessions() as session:  # type: ignore[attr-defined]
        assert session.query(BaseCheckpoint).filter_by(name="q").count() == 0


def test_a_result_is_registered_with_its_lineage_and_report(gateway: Gateway) -> None:
    jobs = store(gateway)
    job = jobs.submit("tiny-gptq", "tiny-base", QuantizeSpec(group_size=16))
    jobs.claim("r1")
    report = {"source": {"perplexity": 20.0}, "result": {"perplexity": 21.0}}
    result = jobs.succeed(job.id, "/models/tiny-gptq", "gptq", report, "done")
    models = {m["name"]: m for m in gateway.client.get("/admin/base-models", headers=gateway.admin()).json()}
    assert models["tiny-gptq"]["parent_id"] == models["tiny-base"]["id"]
    assert models["tiny-gptq"]["report"] == report and models["tiny-gptq"]["active"] is False
    shown = gateway.client.get(f"{JOBS}/{job.id}", headers=gateway.admin()).json()
    assert shown["state"] == "succeeded" and shown["result_model_id"] == result.id
    assert shown["duration_seconds"] is not None


def test_activating_an_unrelated_or_unknown_base_is_refused(gateway: Gateway) -> None:
    with gateway.client.app.state.services.sessions.begin() as session:  # type: ignore[attr-defined]
        session.add(BaseCheckpoint(name="other", path="/x", quantization="none", linear_modules={}, max_context=8))
    models = {m["name"]: m for m in gateway.client.get("/admin/base-models", headers=gateway.admin()).json()}
    resp = gateway.client.post(f"/admin/base-models/{models['other']['id']}/activate", headers=gateway.admin())
    assert resp.status_code == 409 and "not derived" in resp.json()["error"]["message"]
    assert gateway.client.post("/admin/base-models/999/activate", headers=gateway.admin()).status_code == 404


def test_activating_a_derived_base_marks_it_active(gateway: Gateway) -> None:
    jobs = store(gateway)
    job = jobs.submit("tiny-gptq", "tiny-base", QuantizeSpec(group_size=16))
    jobs.claim("r1")
    result = jobs.succeed(job.id, "/models/tiny-gptq", "gptq", {}, "")
    resp = gateway.client.post(f"/admin/base-models/{result.id}/activate", headers=gateway.admin())
    assert resp.status_code == 200, resp.text
    assert resp.json()["moved_workers"] == ["fake-0"] and resp.json()["not_moved_workers"] == []
    assert gateway.worker.reloads == [("/models/tiny-gptq", "tiny-gptq")]  # a remote worker reloads in place
    active = [m["name"] for m in gateway.client.get("/admin/base-models", headers=gateway.admin()).json()
              if m["active"]]
    assert active == ["tiny-gptq"]


def test_job_rows_keep_the_uploaded_text_out_of_listings(gateway: Gateway) -> None:
    jobs = store(gateway)
    jobs.submit("q", "tiny-base", QuantizeSpec(group_size=16, calibration_text="secret corpus " * 20))
    listed = gateway.client.get(JOBS, headers=gateway.admin()).text
    assert "secret corpus" not in listed
    with gateway.client.app.state.services.sessions() as session:  # type: ignore[attr-defined]
        assert "secret corpus" in session.query(QuantizationJob).one().spec["calibration_text"]


def test_reap_leaves_a_live_jobs_directory(gateway: Gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    jobs = store(gateway)
    job = jobs.submit("q", "tiny-base", QuantizeSpec(group_size=16))
    jobs.claim("live-runner")
    live = tmp_path / f"{TMP_PREFIX}{job.id}-abcd1234"
    live.mkdir()
    settings = gateway.settings.model_copy(update={"models_dir": tmp_path})
    runner = JobRunner(settings.job_runner_config(), name="other")
    runner.stale_after = timedelta(hours=1)
    runner.reap()
    assert live.exists() and jobs.get(job.id).state == "running"


def test_reap_spares_a_directory_another_deployments_runner_keeps_fresh(gateway: Gateway, tmp_path: Path) -> None:
    """Two deployments on one models volume: the other's job ids mean nothing in this database, but its
    runner touches its directory with every heartbeat; only an untouched one is a leftover."""
    from dataclasses import replace

    from app.jobrunner import _Child

    jobs = store(gateway)
    job = jobs.submit("q", "tiny-base", QuantizeSpec(group_size=16))
    assert jobs.claim("theirs") is not None
    theirs = tmp_path / f"{TMP_PREFIX}{job.id + 1000}-abcd1234"  # a job this database has never seen
    (theirs / "model").mkdir(parents=True)
    settings = gateway.settings.model_copy(update={"models_dir": tmp_path, "job_stale_after_s": 60})
    reaper = JobRunner(settings.job_runner_config(), name="ours")
    reaper.reap()
    assert theirs.exists()
    an_hour_ago = time.time() - 3600
    os.utime(theirs, (an_hour_ago, an_hour_ago))
    # Their runner's heartbeat makes it fresh again.
    config = replace(settings.job_runner_config(), heartbeat_s=0.05)
    child = _Child([sys.executable, "-c", "import time\ntime.sleep(0.3)\n"])
    try:
        JobRunner(config, name="theirs")._watch(job.id, child, threading.Event(), theirs)
    finally:
        child.kill()
    reaper.reap()
    assert theirs.exists()
    os.utime(theirs, (an_hour_ago, an_hour_ago))  # their runner died an hour ago
    reaper.reap()
    assert not theirs.exists()


def test_jobs_by_state_are_on_the_metrics(gateway: Gateway) -> None:
    jobs = store(gateway)
    jobs.submit("a", "tiny-base", QuantizeSpec(group_size=16))
    jobs.submit("b", "tiny-base", QuantizeSpec(group_size=16))
    jobs.claim("r1")
    text = gateway.client.get("/metrics").text
    for state, count in (("queued", 1), ("running", 1), ("succeeded", 0), ("failed", 0), ("cancelled", 0)):
        assert f'loraplex_quantization_jobs{{state="{state}"}} {count}.0' in text


def test_the_runner_reads_progress_from_the_childs_output() -> None:
    from app.jobrunner import _Child

    child = _Child([sys.executable, "-c", (
        "import sys\n"
        "print('PROGRESS calibrating 0 1', flush=True)\n"
        "sys.stdout.write('Quantizing layer 0 of 29 [0 of 29] 0.0%\\rQuantizing layer 4 of 29 [4 of 29]\\n')\n"
        "print('ValueError: boom', flush=True)\n"
        "sys.exit(3)\n")])
    assert child.wait(30)
    assert child.returncode == 3
    assert child.progress == ("quantizing", 5, 30)  # GPTQModel counts layers from 0 and says "of" the last
    assert child.last_line() == "ValueError: boom"
    assert "Quantizing layer 4 of 29" in child.tail()


def test_a_leftover_result_directory_does_not_fail_the_job(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A restored database or a second deployment on the volume can leave `<name>-job<id>` behind."""
    from app.jobrunner import _move_into_place

    wanted = tmp_path / "quantized" / "small-job1"
    (wanted / "old").mkdir(parents=True)
    (wanted / "old" / "model.safetensors").write_bytes(b"someone else's")
    out = tmp_path / "work"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"this job's")
    final = _move_into_place(out, wanted)
    assert final != wanted and final.parent == wanted.parent and final.name.startswith("small-job1-")
    assert (final / "model.safetensors").read_bytes() == b"this job's"
    assert (wanted / "old" / "model.safetensors").read_bytes() == b"someone else's"


def test_a_child_that_said_done_but_does_not_exit_still_succeeds(gateway: Gateway, tmp_path: Path) -> None:
    """GPTQModel's AWQ left a thread that kept the quantizing process alive after its report was written;
    the job sat in `running` forever. The result is complete once the child says `done`."""
    from dataclasses import replace

    from app.jobrunner import _Child

    jobs = store(gateway)
    job = jobs.submit("q", "tiny-base", QuantizeSpec(group_size=16))
    assert jobs.claim("r1") is not None
    config = replace(gateway.settings.job_runner_config(), heartbeat_s=0.1, exit_grace_s=0.5)
    child = _Child([sys.executable, "-c", "import time\nprint('PROGRESS done 1 1', flush=True)\ntime.sleep(600)\n"])
    started = time.monotonic()
    try:
        assert JobRunner(config, name="r1")._watch(job.id, child, threading.Event(), tmp_path) == "succeeded"
    finally:
        child.kill()
    assert time.monotonic() - started < 30
    assert child.returncode is not None  # killed, not left behind


def test_a_child_that_stops_talking_before_done_is_not_taken_for_finished(gateway: Gateway, tmp_path: Path) -> None:
    from dataclasses import replace

    from app.jobrunner import _Child

    jobs = store(gateway)
    job = jobs.submit("q", "tiny-base", QuantizeSpec(group_size=16))
    assert jobs.claim("r1") is not None
    config = replace(gateway.settings.job_runner_config(), heartbeat_s=0.1, exit_grace_s=0.1)
    child = _Child([sys.executable, "-c", "import sys\nprint('PROGRESS evaluating 1 2', flush=True)\nsys.exit(1)\n"])
    assert JobRunner(config, name="r1")._watch(job.id, child, threading.Event(), tmp_path) == "failed"


def test_two_runners_reaping_at_once_fail_each_stale_job_once_and_spare_a_live_one(gateway: Gateway) -> None:
    jobs = store(gateway)
    stale, live = (jobs.submit(n, "tiny-base", QuantizeSpec(group_size=16)) for n in ("s", "l"))
    jobs.claim("dead-runner")
    jobs.claim("live-runner")
    time.sleep(0.05)
    jobs.heartbeat(live.id, "quantizing", 1, 2, "")  # its runner is alive
    reaped: list[list[int]] = []
    barrier = threading.Barrier(2)

    def reap() -> None:
        barrier.wait()
        reaped.append(JobStore(jobs.sessions).reap_stale(timedelta(seconds=0.03)))

    threads = [threading.Thread(target=reap) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(i for ids in reaped for i in ids) == [stale.id]  # one reaper got it, the other nothing
    assert jobs.get(live.id).state == "running"


def test_a_directory_made_by_a_runner_claiming_during_the_reap_is_left_alone(gateway: Gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    jobs = store(gateway)
    job = jobs.submit("q", "tiny-base", QuantizeSpec(group_size=16))
    settings = gateway.settings.model_copy(update={"models_dir": tmp_path})
    reaper = JobRunner(settings.job_runner_config(), name="reaper")
    new_dir = tmp_path / f"{TMP_PREFIX}{job.id}-abcd1234"
    real_active_ids = reaper.jobs.active_ids

    def claim_meanwhile() -> set[int]:
        before = real_active_ids()  # the reaper's view, read just before another runner claims and
        jobs.claim("another-runner")  # makes its directory
        new_dir.mkdir()
        return before

    reaper.jobs.active_ids = claim_meanwhile  # type: ignore[method-assign]
    reaper.reap()
    assert new_dir.exists()  # listed before the claim, never seen as anybody's leftover


def test_the_runner_outlives_a_database_outage(gateway: Gateway, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.exc import OperationalError

    settings = gateway.settings.model_copy(update={"job_poll_interval_s": 0.01})
    runner = JobRunner(settings.job_runner_config(), name="survivor")
    calls = {"n": 0}
    stop = threading.Event()

    def flaky_claim(name: str) -> None:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise OperationalError("SELECT", {}, Exception("database is down"))
        stop.set()  # it came back and the runner asked again

    monkeypatch.setattr(runner.jobs, "claim", flaky_claim)
    thread = threading.Thread(target=runner.run_forever, args=(stop,))
    thread.start()
    thread.join(10)
    assert not thread.is_alive() and calls["n"] == 4
