"""A large upload streams through the gateway: spooled to disk and mapped, never held in memory."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc

import httpx
import uvicorn
from pydantic import SecretStr

from adapters.models import BaseCheckpoint
from app.main import build_app
from app.settings import Settings
from app.workers.pool import WorkerPool, WorkerSlot
from tests.factory import adapter_files
from tests.unit.conftest import ADMIN_KEY
from tests.unit.fakes import FakeWorkerClient

# 25 modules of 65536 x 65536 at rank 8 in float32: 4 MiB each, 100 MiB of weights.
WIDE = {f"model.layers.{i}.mlp.down_proj": [65536, 65536] for i in range(25)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_100_mib_upload_adds_well_under_its_size_to_gateway_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config, weights = adapter_files(WIDE, rank=8)
    size = len(weights)
    assert size >= 100 * 2**20
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    del weights
    settings = Settings(data_dir=tmp_path / "data", admin_key=SecretStr(ADMIN_KEY), max_lora_rank=8,
                        max_adapter_bytes=128 * 2**20)
    app = build_app(settings, pool=WorkerPool([WorkerSlot(client=FakeWorkerClient())], poll_interval=0.05))
    with app.state.services.sessions.begin() as session:
        session.add(BaseCheckpoint(name="wide", path="/nowhere", quantization="none", linear_modules=WIDE,
                              max_context=512, active=True))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not server.started:
                time.sleep(0.05)
            admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
            key = client.post("/admin/tenants", json={"name": "big"}, headers=admin).json()["api_key"]
            with (tmp_path / "adapter_model.safetensors").open("rb") as fh:
                tracemalloc.start()
                resp = client.post("/adapters", headers={"Authorization": f"Bearer {key}"}, data={"name": "big"},
                                   files=[("files", ("adapter_config.json", config)),
                                          ("files", ("adapter_model.safetensors", fh))])
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
        assert resp.status_code == 201, resp.text
        assert resp.json()["size_bytes"] == size
        # Client and gateway together, every Python and numpy allocation: the upload was spooled
        # to disk and mapped, and validation read one tensor at a time.
        assert peak < size // 4, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB upload"
    finally:
        server.should_exit = True
        thread.join(10)
