"""A real Prometheus server scrapes a running service; every dashboard and alert query returns data."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.e2e.conftest import Server, free_port
from tests.e2e.test_user_path import fixture_files

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian's prometheus package; .ci/run installs it)"
)

DEPLOY = ROOT / "deploy"
RATE_WINDOW = "1m"  # what Grafana's $__rate_interval becomes here
# A threshold comparison filters an alert's series away while it is not firing; what is compared must exist.
THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*[0-9.]+(?![\w\]])")


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    return [THRESHOLD.sub("", rule["expr"]) for rule in rules]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "loraplex.json").read_text())
    return [t["expr"].replace("$__rate_interval", RATE_WINDOW)
            for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def test_threshold_stripping_keeps_what_is_compared() -> None:
    assert THRESHOLD.sub("", "up{job=\"w\"} == 0 or x_ready == 0") == "up{job=\"w\"} or x_ready"
    assert THRESHOLD.sub("", "increase(a_total{o=\"failed\"}[10m]) > 0") == "increase(a_total{o=\"failed\"}[10m])"
    assert THRESHOLD.sub("", "histogram_quantile(0.99, sum by (le) (rate(b[5m]))) > 30") == (
        "histogram_quantile(0.99, sum by (le) (rate(b[5m])))")


def _with_metadata(safetensors: bytes, metadata: dict[str, str]) -> bytes:
    """The same tensors with a different header: other bytes, other blob, same behaviour."""
    size = struct.unpack("<Q", safetensors[:8])[0]
    header = json.loads(safetensors[8:8 + size]) | {"__metadata__": metadata}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + safetensors[8 + size:]


def _tenants(server: Server) -> tuple[str, str]:
    """A tenant with an adapter and one request done (its series exist before the scrapes start;
    a series born with a count already in it has no rate until its next change), and one that allows
    a single request at a time."""
    key = server.new_tenant("scraped")
    with server.client(server.admin_key) as admin:
        narrow = admin.post("/admin/tenants", json={"name": "narrow", "limits": {"max_concurrent_requests": 1}})
        assert narrow.status_code == 201, narrow.text
    # Adapters are content-addressed: weights no other test uploads make this one's first use a cold
    # load (the load-duration histogram's only observation), whatever the session's server has cached.
    config, (weights_part, (weights_name, weights)) = fixture_files("answer42")
    files = [config, (weights_part, (weights_name, _with_metadata(weights, {"scraped": "yes"})))]
    with server.client(key) as client:
        assert client.post("/adapters", data={"name": "scraped-42"}, files=files).status_code == 201
        assert client.post("/generate", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
    return key, str(narrow.json()["api_key"])


def _finish_a_finetuning_job(server: Server, key: str) -> None:
    """A fine-tuning job that starts and is cancelled: a finished job, the job-duration histogram's observation."""
    training = (ROOT / "tests" / "fixtures" / "finetune" / "robot.jsonl").read_bytes()
    with server.client(key) as client:
        uploaded = client.post("/v1/files", data={"purpose": "fine-tune"},
                               files={"file": ("robot.jsonl", training, "application/jsonl")})
        assert uploaded.status_code == 200, uploaded.text
        base = next(m["id"] for m in client.get("/v1/models").json()["data"] if m["owned_by"] == "loraplex")
        job = client.post("/v1/fine_tuning/jobs", json={"model": base, "training_file": uploaded.json()["id"],
                                                        "hyperparameters": {"n_epochs": 25}})
        assert job.status_code == 200, job.text
        url = f"/v1/fine_tuning/jobs/{job.json()['id']}"
        status = _wait_for_job(client, url, lambda s: s not in ("queued", "validating_files"))
        assert status == "running", client.get(url).json()["error"]
        assert client.post(f"{url}/cancel").status_code == 200
        assert _wait_for_job(client, url, lambda s: s != "running") == "cancelled"


def _wait_for_job(client: httpx.Client, url: str, done: Callable[[str], bool]) -> str:
    deadline = time.monotonic() + 120
    while not done(status := str(client.get(url).json()["status"])) and time.monotonic() < deadline:
        time.sleep(0.5)
    return status


def _load(server: Server, key: str, narrow: str) -> None:
    """A little traffic of every kind: adapters and base, streamed and not, a 404 and some 429s."""

    def ask(api_key: str, body: dict[str, object]) -> None:
        with server.client(api_key) as client:
            client.post("/generate", json={"prompt": "Name three colours.", "max_tokens": 12, **body})

    bodies: list[tuple[str, dict[str, object]]] = [
        (key, {"adapter": "scraped-42"}), (key, {}), (key, {"stream": True}), (key, {"adapter": "missing"}),
        *[(narrow, {}) for _ in range(4)],  # concurrent beyond its limit of 1: 429s
    ]
    threads = [threading.Thread(target=ask, args=job) for job in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)


def _query(base: str, expr: str) -> list[dict[str, object]]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


def _scrapes(base: str) -> int:
    """Successful scrapes of the target that has had fewest (0 until Prometheus answers)."""
    try:
        counts = _query(base, "sum_over_time(up[10m])")
    except (httpx.TransportError, ValueError):
        return 0
    return min((int(float(r["value"][1])) for r in counts), default=0) if len(counts) == 2 else 0  # type: ignore[index]


def _wait_for_scrapes(base: str, proc: subprocess.Popen[bytes], count: int) -> None:
    deadline = time.monotonic() + 90
    while _scrapes(base) < count:
        assert proc.poll() is None and time.monotonic() < deadline, f"fewer than {count} scrapes of each target"
        time.sleep(0.5)


def test_prometheus_scrapes_and_every_query_returns_data(server: Server, tmp_path: Path) -> None:
    with server.client(server.admin_key) as admin:
        worker_url = admin.get("/admin/workers").json()[0]["url"]
    targets = {"loraplex-gateway": urlsplit(server.url).netloc, "loraplex-worker": urlsplit(worker_url).netloc}
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                           for job, target in targets.items()],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        key, narrow = _tenants(server)
        _finish_a_finetuning_job(server, key)
        _wait_for_scrapes(base, proc, 2)  # rates need a starting point from before the load
        _load(server, key, narrow)
        _wait_for_scrapes(base, proc, _scrapes(base) + 3)  # and a few points after it
        ups = _query(base, "up")
        up = {r["metric"]["job"]: r["value"][1] for r in ups}  # type: ignore[index]
        assert up == {"loraplex-gateway": "1", "loraplex-worker": "1"}

        # Nothing, or only NaN (a ratio of rates that did not move), means a wrong name or an idle metric.
        empty = [expr for expr in dashboard_exprs() + alert_exprs()
                 if all(r["value"][1] == "NaN" for r in _query(base, expr))]  # type: ignore[index]
        assert not empty, empty

        rules = httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"][0]["rules"]
        assert len(rules) == len(alert_exprs()) and all(r["health"] == "ok" for r in rules), rules
        ttft = {q: _query(base, f"histogram_quantile({q}, sum by (le) "
                                f"(rate(loraplex_time_to_first_token_seconds_bucket[{RATE_WINDOW}])))")
                for q in (0.5, 0.99)}
        values = {q: float(r[0]["value"][1]) for q, r in ttft.items()}  # type: ignore[index]
        print(f"TTFT from Prometheus: p50 {values[0.5]:.3f} s, p99 {values[0.99]:.3f} s")
        assert 0 < values[0.5] <= values[0.99] < 120
    finally:
        proc.terminate()
        proc.wait(30)


def test_one_gateway_scrape_shows_the_workers(server: Server) -> None:
    text = httpx.get(f"{server.url}/metrics/workers", timeout=10).text
    assert re.search(r'^loraplex_worker_up\{worker="[^"]+"\} 1\.0$', text, re.M), text[:500]
    assert re.search(r'^loraplex_worker_memory_bytes\{kind="rss",worker="[^"]+"\} [0-9.e+]+$', text, re.M)
