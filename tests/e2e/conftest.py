"""`loraplex serve` as a real subprocess on free ports, shared by the e2e session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    admin_key: str
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes]
    models_dir: Path

    def client(self, key: str | None = None, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def new_tenant(self, name: str) -> str:
        with self.client(self.admin_key) as admin:
            response = admin.post("/admin/tenants", json={"name": name})
        assert response.status_code == 201, response.text
        return str(response.json()["api_key"])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, path: str = "/health/ready") -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"loraplex serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"loraplex serve not ready after {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


@contextmanager
def running_server(models_dir: Path, data_dir: Path, port: int | None = None, **settings: str) -> Iterator[Server]:
    """`loraplex serve` in a subprocess on free ports, ready to answer; LORAPLEX_* overrides as keywords."""
    port = port or free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "LORAPLEX_DATA_DIR": str(data_dir),
        "LORAPLEX_MODELS_DIR": str(models_dir),  # the prepared model, not converted again
        "LORAPLEX_PORT": str(port),
        "LORAPLEX_WORKER_BASE_PORT": str(free_port()),
        "LORAPLEX_WORKER_THREADS": "2",
        "LORAPLEX_MAX_TOKENS_LIMIT": "256",
        "LORAPLEX_MAX_ADAPTER_BYTES": str(20 * 2**20),
        **{f"LORAPLEX_{k.upper()}": v for k, v in settings.items()},
    }
    log = data_dir / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log, "/health/live" if settings.get("workers") == "0" else "/health/ready")
        yield Server(url, (data_dir / "admin_key").read_text().strip(), data_dir, log, proc, models_dir)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def job_runner(server: Server, **settings: str) -> Iterator[subprocess.Popen[bytes]]:
    """A `loraplex job-runner` process for `server`'s database and directories; LORAPLEX_* overrides as keywords."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAPLEX_DATA_DIR": str(server.data_dir),
           "LORAPLEX_MODELS_DIR": str(server.models_dir), "LORAPLEX_JOB_POLL_INTERVAL_S": "0.5",
           "LORAPLEX_JOB_HEARTBEAT_S": "0.5", **{f"LORAPLEX_{k.upper()}": v for k, v in settings.items()}}
    with (server.data_dir / "job-runner.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "job-runner"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


@pytest.fixture(scope="session")
def server(prepared_model, tmp_path_factory) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    with running_server(prepared_model.path.parent, tmp_path_factory.mktemp("serve-data")) as running:
        yield running


@pytest.fixture(scope="session")
def two_workers(prepared_model, tmp_path_factory) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    """A second service with two local workers (one torch thread each: the machine has two cores)."""
    data_dir = tmp_path_factory.mktemp("two-workers")
    with running_server(prepared_model.path.parent, data_dir, workers="2", worker_threads="1") as running:
        yield running
