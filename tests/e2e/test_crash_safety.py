"""A gateway killed in the middle of an upload leaves no version and no file behind."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import httpx

from tests.conftest import ADAPTERS
from tests.e2e.conftest import running_server


def test_kill_mid_upload_leaves_nothing_after_restart(prepared_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    models = prepared_model.path.parent
    weights = (ADAPTERS / "meow" / "adapter_model.safetensors").read_bytes()
    config = (ADAPTERS / "meow" / "adapter_config.json").read_bytes()
    half_sent = threading.Event()

    def slow_body():  # type: ignore[no-untyped-def]
        yield b'--xyz\r\nContent-Disposition: form-data; name="name"\r\n\r\ncut-short\r\n'
        yield b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="adapter_config.json"\r\n\r\n'
        yield config + b"\r\n"
        yield b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n\r\n'
        for at in range(0, len(weights), 256 * 1024):
            yield weights[at : at + 256 * 1024]
            half_sent.set()
            time.sleep(0.5)  # slow client: the gateway dies while this is in flight
        yield b"\r\n--xyz--\r\n"

    with running_server(models, tmp_path, workers="0") as server:  # no worker needed to store adapters
        key = server.new_tenant("crashy")

        def upload() -> None:
            headers = {"Authorization": f"Bearer {key}", "content-type": "multipart/form-data; boundary=xyz"}
            with contextlib.suppress(httpx.TransportError):  # the server dies under it, as intended
                httpx.post(f"{server.url}/adapters", headers=headers, content=slow_body(), timeout=60)

        uploader = threading.Thread(target=upload)
        uploader.start()
        assert half_sent.wait(30)
        time.sleep(0.3)
        os.kill(server.proc.pid, signal.SIGKILL)
        uploader.join(60)
        port = int(server.url.rsplit(":", 1)[1])

    with running_server(models, tmp_path, port=port, workers="0") as restarted:
        with restarted.client(key) as client:
            assert client.get("/adapters").json() == []
            assert client.get("/adapters/cut-short").status_code == 404
        leftovers = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
        assert leftovers == []  # no blob and no temp file
