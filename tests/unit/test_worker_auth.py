"""A worker answers only its gateway: the shared worker token on every route but the bare probes."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.cli import main as cli
from app.settings import Settings
from app.workers.client import HttpWorkerClient
from worker.auth import TOKEN_ENV, check_token
from worker.config import WorkerConfig
from worker.runtime import WorkerRuntime
from worker.server import build_worker_app

TOKEN = "t" * 40
GENERATE = {"request_id": "r1", "prompt": "hi", "adapter": {"key": "someone-elses", "weights_sha256": "a" * 64,
                                                            "config_sha256": "b" * 64}}


@pytest.fixture
def worker(tmp_path: Path) -> TestClient:
    """The worker's API on a runtime that was never started (no model: the gate comes first)."""
    config = WorkerConfig(model_path=tmp_path, model_name="m", blob_url=str(tmp_path))
    return TestClient(build_worker_app(WorkerRuntime(config), TOKEN))  # no `with`: the model is not loaded


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Bearer {TOKEN}x", TOKEN, f"Basic {TOKEN}"])
def test_every_worker_route_refuses_a_call_without_the_token(worker: TestClient, header: str | None) -> None:
    headers = {} if header is None else {"authorization": header}
    calls = [worker.post("/generate", json=GENERATE, headers=headers),
             worker.post("/adapters/evict", json={"key": "someone-elses"}, headers=headers),
             worker.get("/health", headers=headers)]  # the full health lists resident adapter keys
    for answer in calls:
        assert answer.status_code == 401 and "worker token" in answer.json()["error"]["message"]


def test_the_token_opens_the_routes_and_the_probes_and_metrics_need_none(worker: TestClient) -> None:
    health = worker.get("/health", headers={"authorization": f"Bearer {TOKEN}"})
    assert health.status_code == 200 and health.json()["ready"] is False  # the model was never loaded
    assert worker.post("/generate", json=GENERATE, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 503
    assert worker.get("/health/live").status_code == 200
    ready = worker.get("/health/ready")
    assert ready.status_code == 503 and set(ready.json()) == {"ready", "error"}  # bare: no adapter keys
    assert worker.get("/metrics").status_code == 200
    assert worker.get("/openapi.json").status_code == 401  # its description is behind the gate too
    assert worker.get("/openapi.json", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 404  # and off


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.7", "::", "worker-0"])
def test_a_worker_others_can_reach_will_not_start_without_a_token(host: str) -> None:
    with pytest.raises(ValueError, match=f"{TOKEN_ENV}"):
        check_token(None, host)
    check_token(TOKEN, host)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_a_loopback_worker_may_run_without_a_token(host: str) -> None:
    check_token(None, host)


def test_short_tokens_are_refused_by_worker_and_gateway(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        check_token("short", "127.0.0.1")
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(data_dir=tmp_path, worker_token="short")  # type: ignore[arg-type]


def test_the_worker_command_refuses_a_public_address_without_a_token(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit, match=f"0.0.0.0 needs {TOKEN_ENV}"):
        cli(["worker", "--model-path", str(tmp_path), "--model-name", "m", "--blob-url", str(tmp_path),
             "--host", "0.0.0.0"])


def test_production_needs_a_token_for_remote_workers(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="LORAPLEX_WORKER_TOKEN"):
        Settings(data_dir=tmp_path, env="production", admin_key="k" * 40,  # type: ignore[arg-type]
                 worker_urls=["http://gpu-1:8100"])
    Settings(data_dir=tmp_path, env="production", admin_key="k" * 40, worker_token=TOKEN,  # type: ignore[arg-type]
             worker_urls=["http://gpu-1:8100"])


def test_the_gateways_client_sends_the_token() -> None:
    client = HttpWorkerClient("w", "http://127.0.0.1:1", token=TOKEN)
    assert client._http.headers["authorization"] == f"Bearer {TOKEN}"
    assert "authorization" not in HttpWorkerClient("w", "http://127.0.0.1:1")._http.headers


@pytest.mark.parametrize("admin_key", [None, "k" * 20, "replace-with-a-long-random-string-please-now"])
def test_production_refuses_short_or_placeholder_admin_keys(tmp_path: Path, admin_key: str | None) -> None:
    with pytest.raises(ValidationError, match="LORAPLEX_ADMIN_KEY"):
        Settings(data_dir=tmp_path, env="production", admin_key=admin_key)  # type: ignore[arg-type]


def test_the_shipped_kubernetes_secrets_would_not_start_in_production(tmp_path: Path) -> None:
    import yaml

    from tests.conftest import ROOT
    values = {k: v for doc in yaml.safe_load_all((ROOT / "deploy/k8s/secret.yaml").read_text())
              for k, v in doc["stringData"].items()}
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(data_dir=tmp_path, env="production", admin_key=values["LORAPLEX_ADMIN_KEY"] + "x" * 32)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(data_dir=tmp_path, env="production", admin_key="k" * 40,  # type: ignore[arg-type]
                 worker_token=values["LORAPLEX_WORKER_TOKEN"] + "x" * 32)
