"""Line 5: the whole service over HTTP, concurrent requests against the same ones one at a time."""

from __future__ import annotations

import io
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.common import PROMPTS, Row
from worker.auth import TOKEN_ENV
from worker.model import PreparedModel
from worker.protocol import GenerateEvent, GenerateRequest, SamplingParams

REQUESTS = 16
OVERHEAD_ROUNDS = 62


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _zipped(directory: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in directory.iterdir():
            zf.write(f, f.name)
    return buf.getvalue()


def _serve(prepared: PreparedModel, threads: int, worker_port: int,
           worker_token: str) -> tuple[subprocess.Popen[bytes], str, str]:
    data_dir = Path(tempfile.mkdtemp(prefix="loraplex-bench-serve-"))
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAPLEX_DATA_DIR": str(data_dir), TOKEN_ENV: worker_token,
           "LORAPLEX_MODELS_DIR": str(prepared.path.parent), "LORAPLEX_PORT": str(port),
           "LORAPLEX_WORKER_BASE_PORT": str(worker_port), "LORAPLEX_WORKER_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return proc, url, (data_dir / "admin_key").read_text().strip()
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("loraplex serve did not become ready")


def http_lines(prepared: PreparedModel, adapter_dirs: list[Path], threads: int, new_tokens: int,
               rounds: int = 3) -> list[Row]:
    """The 16 requests one at a time and all at once, `rounds` interleaved rounds of each: the medians, and the
    median of each round's ratio (one round of each swung from 2.89x to 3.71x between runs on one host)."""
    worker_port = _free_port()
    # The worker answers only its gateway's token; the direct line below must send it too (without it
    # the "direct" request was a 401 in 2 ms, and the gateway looked 189 ms slower than it is).
    worker_token = secrets.token_urlsafe(32)
    proc, url, admin_key = _serve(prepared, threads, worker_port, worker_token)
    try:
        admin = {"Authorization": f"Bearer {admin_key}"}
        key = httpx.post(f"{url}/admin/tenants", json={"name": "bench"}, headers=admin).json()["api_key"]
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
        names = []
        for i, directory in enumerate(adapter_dirs):
            names.append(f"bench-{i}")
            files = [("files", ("adapter.zip", _zipped(directory)))]
            client.post("/adapters", data={"name": names[-1]}, files=files).raise_for_status()
        bodies = [{"messages": [{"role": "user", "content": PROMPTS[i]}], "adapter": names[i % len(names)],
                   "max_tokens": new_tokens} for i in range(REQUESTS)]  # chat-formatted, as applications send

        def call(body: dict[str, object]) -> int:
            response = client.post("/generate", json=body)
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])

        for body in bodies[: len(names)]:  # every adapter loaded once before timing
            call(body)
        sequentials, concurrents = [], []
        with ThreadPoolExecutor(REQUESTS) as pool:
            for _ in range(rounds):
                started = time.perf_counter()
                sequential_tokens = sum(call(b) for b in bodies)
                sequentials.append(sequential_tokens / (time.perf_counter() - started))
                started = time.perf_counter()
                concurrent_tokens = sum(pool.map(call, bodies))
                concurrents.append(concurrent_tokens / (time.perf_counter() - started))
        direct, gateway = _overhead(client, f"http://127.0.0.1:{worker_port}", worker_token)
    finally:
        proc.terminate()
        proc.wait(30)
    what = f"HTTP /generate, chat messages, {REQUESTS} requests over {len(names)} adapters"
    ratio = statistics.median(c / s for c, s in zip(concurrents, sequentials, strict=True))
    rows = [
        Row("5", f"{what}, one at a time", "1", statistics.median(sequentials), "tok/s", "1.00"),
        Row("5", f"{what}, concurrent", REQUESTS, statistics.median(concurrents), "tok/s", f"{ratio:.2f}", "≥ 3.50"),
    ]
    for q, label in ((50, "p50"), (99, "p99")):
        d, g = _percentile(direct, q), _percentile(gateway, q)
        rows.append(Row("5", "1-token request, worker called directly", label, d, "ms"))
        rows.append(Row("5", "1-token request through the gateway (auth, registry, routing)", label, g, "ms",
                        f"{g / d:.2f}", f"+{g - d:.1f} ms"))
    return rows


def _percentile(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _overhead(client: httpx.Client, worker_url: str, worker_token: str,
              rounds: int = OVERHEAD_ROUNDS) -> tuple[list[float], list[float]]:
    """The same 1-token request straight to the worker and through the gateway, alternated (ms)."""
    direct: list[float] = []
    gateway: list[float] = []
    headers = {"content-type": "application/json", "authorization": f"Bearer {worker_token}"}
    with httpx.Client(base_url=worker_url, timeout=60) as worker:
        for _round in range(rounds):
            request = GenerateRequest(request_id=uuid.uuid4().hex, prompt=PROMPTS[0],
                                      sampling=SamplingParams(max_tokens=1))
            started = time.perf_counter()
            with worker.stream("POST", "/generate", content=request.model_dump_json(), headers=headers) as response:
                response.raise_for_status()
                final = GenerateEvent.model_validate_json([line for line in response.iter_lines() if line][-1])
            if not final.finished or final.error is not None:
                raise RuntimeError(f"the worker did not answer the direct request: {final}")
            direct.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            client.post("/generate", json={"prompt": PROMPTS[0], "max_tokens": 1}).raise_for_status()
            gateway.append((time.perf_counter() - started) * 1000)
    return direct[2:], gateway[2:]  # the first rounds warm connections up
