"""Fine-tuning jobs' API and bookkeeping, on SQLite and PostgreSQL (no training runs here: the e2e test trains)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import update

from adapters.finetuning import FineTuningJobs
from adapters.models import FineTuningJob
from app.jobrunner import FT_TMP_PREFIX, JobRunner, fine_tuned_name
from tests.factory import TINY_BASE, adapter_files
from tests.unit.conftest import Gateway
from tests.unit.test_finetune_files import jsonl, upload

JOBS = "/v1/fine_tuning/jobs"


def store(gateway: Gateway) -> FineTuningJobs:
    return gateway.client.app.state.services.finetune_jobs  # type: ignore[attr-defined,no-any-return]


def training_file(gateway: Gateway, tenant: dict[str, str], rows: int = 40) -> str:
    resp = upload(gateway, tenant, jsonl(rows))
    assert resp.status_code == 200, resp.text
    return str(resp.json()["id"])


def create(gateway: Gateway, tenant: dict[str, str], **body: object):  # type: ignore[no-untyped-def]
    return gateway.client.post(JOBS, headers=tenant, json={"model": "tiny-base", **body})


def test_a_job_is_created_with_auto_hyperparameters_resolved(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    file_id = training_file(gateway, tenant)
    resp = create(gateway, tenant, training_file=file_id, suffix="robot", seed=7)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert (job["status"], job["model"], job["training_file"], job["seed"], job["user_provided_suffix"]) == (
        "queued", "tiny-base", file_id, 7, "robot")
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
    assert job["method"]["type"] == "supervised" and job["fine_tuned_model"] is None and job["error"] is None
    assert gateway.client.get(f"{JOBS}/{job['id']}", headers=tenant).json()["id"] == job["id"]


def test_method_supervised_hyperparameters_are_taken_too(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    file_id = training_file(gateway, tenant)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4,
                                                                       "learning_rate_multiplier": 0.5}}}
    job = create(gateway, tenant, training_file=file_id, method=method).json()
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}


@pytest.mark.parametrize(("body", "status", "names"), [
    ({"hyperparameters": {"n_epochs": 0}}, 400, "n_epochs must be 1-50"),
    ({"hyperparameters": {"n_epochs": 51}}, 400, "n_epochs"),
    ({"hyperparameters": {"batch_size": 65}}, 400, "batch_size must be 1-64"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, 400, "learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": 11}}, 400, "learning_rate_multiplier"),
    ({"hyperparameters": {"n_epochs": "many"}}, 422, "n_epochs"),
    ({"hyperparameters": {"warmup": 3}}, 422, "warmup"),
    ({"method": {"type": "dpo"}}, 400, "method.type 'dpo' is not supported"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 3}}}}, 400, "differ"),
    ({"suffix": "has space"}, 400, "suffix"),
    ({"suffix": "x" * 41}, 400, "suffix"),
    ({"seed": -1}, 400, "seed"),
    ({"model": "no-such-model"}, 404, "no-such-model"),
    ({"training_file": "file-nope"}, 404, "file-nope"),
    ({"validation_file": "file-nope"}, 404, "file-nope"),
    ({"loraplex": {"lora_rank": 9}}, 400, "max_lora_rank"),
    ({"loraplex": {"lora_alpha": 0}}, 400, "lora_alpha"),
    ({"loraplex": {"lora_dropout": 1.0}}, 400, "lora_dropout"),
    ({"loraplex": {"target_modules": ["lm_head"]}}, 400, "not linear layers of the base model"),
    ({"loraplex": {"target_modules": []}}, 400, "target_modules"),
    ({"integrations": [{"type": "wandb"}]}, 400, "integrations"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata holds at most 16"),
    ({"metadata": {"k": "v" * 513}}, 400, "metadata"),
    ({"unknown": 1}, 422, "unknown"),
])
def test_a_job_that_cannot_run_is_refused_before_anything_is_queued(gateway: Gateway, body: dict[str, object],
                                                                    status: int, names: str) -> None:
    tenant = gateway.new_tenant("acme")
    resp = create(gateway, tenant, **{"training_file": training_file(gateway, tenant), **body})
    assert resp.status_code == status, resp.text
    assert names in resp.json()["error"]["message"]
    assert gateway.client.get(JOBS, headers=tenant).json()["data"] == []


def test_too_few_examples_are_refused(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    resp = create(gateway, tenant, training_file=training_file(gateway, tenant, rows=9))
    assert resp.status_code == 400 and "has 9 examples; fine-tuning needs at least 10" in resp.text


def test_another_tenants_jobs_files_and_adapters_are_not_found(gateway: Gateway) -> None:
    owner, other = gateway.new_tenant("owner"), gateway.new_tenant("other")
    file_id = training_file(gateway, owner)
    job_id = create(gateway, owner, training_file=file_id).json()["id"]
    for method, path in (("GET", f"{JOBS}/{job_id}"), ("POST", f"{JOBS}/{job_id}/cancel"),
                         ("GET", f"{JOBS}/{job_id}/events")):
        assert gateway.client.request(method, path, headers=other).status_code == 404
    assert gateway.client.get(JOBS, headers=other).json()["data"] == []
    assert create(gateway, other, training_file=file_id).status_code == 404  # its file is not theirs
    config, weights = adapter_files(TINY_BASE)
    gateway.client.post("/adapters", headers=owner, data={"name": "mine"},
                        files=[("files", ("adapter_config.json", config)),
                               ("files", ("adapter_model.safetensors", weights))])
    theirs = create(gateway, other, training_file=training_file(gateway, other), model="mine")
    assert theirs.status_code == 404 and "your own adapters" in theirs.json()["error"]["message"]


def test_continuing_from_an_own_adapter_keeps_its_shape(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    config, weights = adapter_files(TINY_BASE, rank=4)
    gateway.client.post("/adapters", headers=tenant, data={"name": "mine"},
                        files=[("files", ("adapter_config.json", config)),
                               ("files", ("adapter_model.safetensors", weights))])
    file_id = training_file(gateway, tenant)
    job = create(gateway, tenant, training_file=file_id, model="mine").json()
    assert job["model"] == "mine"
    assert job["hyperparameters"]["n_epochs"] == 3
    shaped = create(gateway, tenant, training_file=file_id, model="mine", loraplex={"lora_rank": 2})
    assert shaped.status_code == 400 and "cannot be set when continuing" in shaped.text


def test_list_is_newest_first_and_paginates(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    gateway.settings.finetune_max_active_jobs = 10
    file_id = training_file(gateway, tenant)
    ids = [create(gateway, tenant, training_file=file_id).json()["id"] for _ in range(3)]
    first = gateway.client.get(JOBS, headers=tenant, params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    rest = gateway.client.get(JOBS, headers=tenant, params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and rest["has_more"] is False


def test_cancel_a_queued_job_and_read_its_events(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    file_id = training_file(gateway, tenant)
    job_id = create(gateway, tenant, training_file=file_id).json()["id"]
    busy = gateway.client.delete(f"/v1/files/{file_id}", headers=tenant)
    assert busy.status_code == 409 and job_id in busy.json()["error"]["message"]
    cancelled = gateway.client.post(f"{JOBS}/{job_id}/cancel", headers=tenant).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    again = gateway.client.post(f"{JOBS}/{job_id}/cancel", headers=tenant)
    assert again.status_code == 409 and "already cancelled" in again.text
    events = gateway.client.get(f"{JOBS}/{job_id}/events", headers=tenant).json()
    assert [e["message"] for e in events["data"]] == ["Fine-tuning job cancelled", f"Created fine-tuning job {job_id}"]
    assert all(e["object"] == "fine_tuning.job.event" for e in events["data"])
    older = gateway.client.get(f"{JOBS}/{job_id}/events", headers=tenant,
                               params={"after": events["data"][0]["id"], "limit": 1}).json()
    assert [e["message"] for e in older["data"]] == [f"Created fine-tuning job {job_id}"]
    assert gateway.client.delete(f"/v1/files/{file_id}", headers=tenant).status_code == 200


def test_limits_are_429s_that_name_them(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    gateway.settings.finetune_max_active_jobs = 1
    file_id = training_file(gateway, tenant)
    first = create(gateway, tenant, training_file=file_id).json()["id"]
    busy = create(gateway, tenant, training_file=file_id)
    assert busy.status_code == 429 and "finetune_max_active_jobs" in busy.text and busy.headers["Retry-After"]
    gateway.client.post(f"{JOBS}/{first}/cancel", headers=tenant)
    gateway.settings.finetune_tokens_per_day = 1000
    with store(gateway).sessions.begin() as session:  # the cancelled job had read 1000 tokens of its files
        session.execute(update(FineTuningJob).values(trained_tokens=1000))
    spent = create(gateway, tenant, training_file=file_id)
    assert spent.status_code == 429 and "finetune_tokens_per_day" in spent.text
    assert 0 < int(spent.headers["Retry-After"]) <= 86_401
    other = gateway.new_tenant("fresh")
    assert create(gateway, other, training_file=training_file(gateway, other)).status_code == 200


def test_events_reported_by_the_child_are_stored_and_count_tokens(gateway: Gateway) -> None:
    tenant = gateway.new_tenant("acme")
    job_id = create(gateway, tenant, training_file=training_file(gateway, tenant)).json()["id"]
    jobs = store(gateway)
    claimed = jobs.claim("runner-a")
    assert claimed is not None and claimed.public_id == job_id
    shown = gateway.client.get(f"{JOBS}/{job_id}", headers=tenant).json()
    assert shown["status"] == "validating_files"
    events = [{"message": "Files validated", "data": {"trained_tokens": 1234}},
              {"message": "Step 1/3: training loss=2.0", "type": "metrics", "data": {"step": 1, "train_loss": 2.0}}]
    assert jobs.heartbeat(claimed.id, "training", 1, 3, "", events) is False
    shown = gateway.client.get(f"{JOBS}/{job_id}", headers=tenant).json()
    assert (shown["status"], shown["progress"]) == ("running", {"done": 1, "total": 3})
    listed = gateway.client.get(f"{JOBS}/{job_id}/events", headers=tenant).json()["data"]
    assert listed[0]["type"] == "metrics" and listed[0]["data"]["train_loss"] == 2.0
    assert jobs.find(claimed.tenant_id, job_id).trained_tokens == 1234
    gateway.client.post(f"{JOBS}/{job_id}/cancel", headers=tenant)
    assert jobs.heartbeat(claimed.id, "training", 2, 3, "") is True  # the runner stops it


def test_a_result_is_registered_as_the_tenants_adapter_and_served_by_name(gateway: Gateway, tmp_path: Path) -> None:
    tenant = gateway.new_tenant("acme")
    job_id = create(gateway, tenant, training_file=training_file(gateway, tenant), suffix="robot").json()["id"]
    runner = _runner(gateway, tmp_path)
    job = runner.finetunes.claim("r")
    assert job is not None
    out = _trained(tmp_path)
    runner._register_adapter(job, out, "log")
    shown = gateway.client.get(f"{JOBS}/{job_id}", headers=tenant).json()
    name = shown["fine_tuned_model"]
    assert shown["status"] == "succeeded" and name == fine_tuned_name("tiny-base", "robot", job_id)
    assert name.startswith("ft:tiny-base:robot:") and shown["report"]["trained_tokens"] == 99
    assert shown["trained_tokens"] == 99
    models = [m["id"] for m in gateway.client.get("/v1/models", headers=tenant).json()["data"]]
    assert name in models
    other = gateway.new_tenant("other")
    assert name not in [m["id"] for m in gateway.client.get("/v1/models", headers=other).json()["data"]]
    events = [e["message"] for e in gateway.client.get(f"{JOBS}/{job_id}/events", headers=tenant).json()["data"]]
    assert events[:2] == ["The job has successfully completed", f"New fine-tuned model created: {name}"]
    scraped = gateway.client.get("/metrics").text
    assert 'loraplex_finetune_jobs{state="succeeded"} 1.0' in scraped
    assert "loraplex_finetune_trained_tokens 99.0" in scraped
    assert "loraplex_finetune_job_duration_seconds_count 1.0" in scraped
    # Uploads cannot take a fine-tuned name.
    config, weights = adapter_files(TINY_BASE)
    spoof = gateway.client.post("/adapters", headers=other, data={"name": name},
                                files=[("files", ("adapter_config.json", config)),
                                       ("files", ("adapter_model.safetensors", weights))])
    assert spoof.status_code == 400


def test_a_job_cancelled_while_its_result_is_registered_keeps_no_adapter(gateway: Gateway, tmp_path: Path) -> None:
    tenant = gateway.new_tenant("acme")
    job_id = create(gateway, tenant, training_file=training_file(gateway, tenant)).json()["id"]
    runner = _runner(gateway, tmp_path)
    job = runner.finetunes.claim("r")
    assert job is not None
    original = runner.finetunes.succeed

    def cancelled_first(*args: object, **kwargs: object) -> bool:
        gateway.client.post(f"{JOBS}/{job_id}/cancel", headers=tenant)
        runner.finetunes.end(job.id, "cancelled", None, "")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    runner.finetunes.succeed = cancelled_first  # type: ignore[method-assign]
    runner._register_adapter(job, _trained(tmp_path), "log")
    shown = gateway.client.get(f"{JOBS}/{job_id}", headers=tenant).json()
    assert shown["status"] == "cancelled" and shown["fine_tuned_model"] is None
    assert gateway.client.get("/adapters", headers=tenant).json() == []


def test_reap_removes_a_dead_jobs_directory_and_fails_it(gateway: Gateway, tmp_path: Path) -> None:
    tenant = gateway.new_tenant("acme")
    job_id = create(gateway, tenant, training_file=training_file(gateway, tenant)).json()["id"]
    runner = _runner(gateway, tmp_path, stale_after_s=0.0)
    job = runner.finetunes.claim("dead-runner")
    assert job is not None
    leftover = tmp_path / "models" / f"{FT_TMP_PREFIX}{job.id}-abcd1234"
    leftover.mkdir(parents=True)
    runner.reap()
    assert not leftover.exists()
    shown = gateway.client.get(f"{JOBS}/{job_id}", headers=tenant).json()
    assert shown["status"] == "failed" and "no heartbeat" in shown["error"]["message"]
    assert shown["error"]["code"] == "job_failed"


def _runner(gateway: Gateway, tmp_path: Path, stale_after_s: float = 30.0) -> JobRunner:
    from app.jobrunner import JobRunnerConfig

    settings = gateway.settings
    return JobRunner(JobRunnerConfig(database_url=settings.resolved_database_url, data_dir=settings.data_dir,
                                     models_dir=tmp_path / "models", blob_url=settings.resolved_blob_url,
                                     max_lora_rank=settings.max_lora_rank, stale_after_s=stale_after_s))


def _trained(tmp_path: Path) -> Path:
    """What a training process leaves: PEFT's two files and the report."""
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    config, weights = adapter_files(TINY_BASE, seed=3)
    (out / "adapter" / "adapter_config.json").write_bytes(config)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(weights)
    (out / "report.json").write_text(json.dumps({"trained_tokens": 99, "train_loss": [1.0, 0.5]}))
    return out
