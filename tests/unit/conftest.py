"""A gateway over a fake worker, a SQLite file and a tiny registered base model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from adapters.models import BaseCheckpoint
from app.main import build_app
from app.settings import Settings
from app.workers.pool import WorkerPool, WorkerSlot
from tests.factory import TINY_BASE
from tests.unit.fakes import FakeWorkerClient

ADMIN_KEY = "admin-key-for-unit-tests"


@dataclass
class Gateway:
    client: TestClient
    worker: FakeWorkerClient
    settings: Settings

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    def new_tenant(self, name: str) -> dict[str, str]:
        resp = self.client.post("/admin/tenants", json={"name": name}, headers=self.admin())
        assert resp.status_code == 201, resp.text
        return {"Authorization": f"Bearer {resp.json()['api_key']}"}


@contextmanager
def gateway_client(settings: Settings, workers: list[FakeWorkerClient]) -> Iterator[TestClient]:
    """A gateway over fake workers with the tiny base model registered, once its workers are ready."""
    app = build_app(settings, pool=WorkerPool([WorkerSlot(client=w) for w in workers], poll_interval=0.05))
    with app.state.services.sessions.begin() as session:
        session.add(BaseCheckpoint(name="tiny-base", path="/nowhere", quantization="none",
                              linear_modules=TINY_BASE, max_context=512, active=True))
    with TestClient(app) as client:
        deadline = time.monotonic() + 5
        while client.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        yield client


@pytest.fixture
def gateway(tmp_path, database_url) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path, admin_key=SecretStr(ADMIN_KEY), max_lora_rank=8,
                        max_adapter_bytes=200_000, max_tokens_limit=64, database_url=database_url)
    worker = FakeWorkerClient()
    with gateway_client(settings, [worker]) as client:
        yield Gateway(client, worker, settings)
