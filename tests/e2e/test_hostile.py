"""Two tenants on one running service: whatever the attacker sends, the bystander is unharmed.

For every hostile request or adapter the attacker gets a 4xx or a clean error within a
bound; then the bystander's greedy answers are byte-identical to their baselines, and the
worker is ready, live and has not restarted. The last tests freeze the worker (SIGSTOP) to
show that a hung worker is noticed, that no caller waits forever, and that it is replaced.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from tests.e2e.conftest import Server, running_server
from tests.e2e.test_user_path import fixture_files

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
BOUND_S = 20.0  # the attacker's answer, error or not, comes within this
IDLE_TIMEOUT_S, STALL_TIMEOUT_S = 8, 12


@dataclass
class Arena:
    server: Server
    attacker: httpx.Client
    bystander: httpx.Client
    baselines: dict[str | None, str]  # the bystander's greedy answer alone, by adapter
    worker_pid: int

    def worker(self) -> dict:  # type: ignore[type-arg]
        with self.server.client(self.server.admin_key) as admin:
            return dict(admin.get("/admin/workers").json()[0])

    def bystander_answer(self, adapter: str | None) -> str:
        body = {"messages": FRANCE, "max_tokens": 12, **({"adapter": adapter} if adapter else {})}
        resp = self.bystander.post("/generate", json=body)
        assert resp.status_code == 200, resp.text
        return str(resp.json()["text"])

    def assert_unharmed(self) -> None:
        for adapter, baseline in self.baselines.items():
            assert self.bystander_answer(adapter) == baseline, adapter
        worker = self.worker()
        assert worker["ready"] and worker["restarts"] == 0 and worker["pid"] == self.worker_pid, worker


@pytest.fixture(scope="module")
def arena(prepared_model, tmp_path_factory) -> Iterator[Arena]:  # type: ignore[no-untyped-def]
    data_dir = tmp_path_factory.mktemp("hostile")
    with running_server(prepared_model.path.parent, data_dir, max_tokens_limit="16", max_messages="64",
                        worker_idle_timeout_s=str(IDLE_TIMEOUT_S), worker_stall_timeout_s=str(STALL_TIMEOUT_S),
                        job_runner="false") as server:
        attacker = server.client(server.new_tenant("mallory"), timeout=60)
        bystander = server.client(server.new_tenant("bob"), timeout=60)
        resp = bystander.post("/adapters", data={"name": "helper"}, files=fixture_files("answer42"))
        assert resp.status_code == 201, resp.text
        arena = Arena(server, attacker, bystander, {}, 0)
        arena.baselines = {None: arena.bystander_answer(None), "helper": arena.bystander_answer("helper")}
        assert "Paris" in arena.baselines[None] and "42" in arena.baselines["helper"]
        arena.worker_pid = arena.worker()["pid"]
        yield arena
        attacker.close()
        bystander.close()


def timed_post(client: httpx.Client, path: str, **kwargs: object) -> httpx.Response:
    started = time.monotonic()
    resp = client.post(path, **kwargs)  # type: ignore[arg-type]
    assert time.monotonic() - started < BOUND_S, f"{path} took {time.monotonic() - started:.1f}s"
    return resp


DEEP_SCHEMA: dict = {"type": "string"}  # type: ignore[type-arg]
for _ in range(40):
    DEEP_SCHEMA = {"type": "array", "items": DEEP_SCHEMA}

HOSTILE_BODIES = {
    "seed 2**64": ("/generate", {"messages": FRANCE, "temperature": 0.7, "seed": 2**64}, "seed"),
    "denormal temperature": ("/generate", {"messages": FRANCE, "temperature": 5e-324}, "temperature"),
    "huge role": ("/generate", {"messages": [{"role": "x" * 200_000, "content": "hi"}]}, "role"),
    "too many messages": ("/generate", {"messages": FRANCE * 65}, "max_messages"),
    "prompt past the context": ("/generate", {"prompt": "word " * 19_000}, "context"),
    "lone surrogate": ("/v1/chat/completions", {"model": "helper", "messages": [{"role": "user",
                                                                              "content": "\ud800"}]}, "surrogate"),
    "image part": ("/v1/chat/completions", {"model": "helper", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "content"),
    "openai seed": ("/v1/completions", {"model": "helper", "prompt": "hi", "seed": -5}, "seed"),
    "schema that cannot compile": ("/generate", {"messages": FRANCE, "stream": True,
                                   "response_format": {"type": "json_schema", "json_schema": {
                                       "name": "x", "schema": {"type": "string", "pattern": "(("}}}},
                                   "response_format"),
    "schema nested 40 deep": ("/generate", {"messages": FRANCE, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": DEEP_SCHEMA}}}, "nests deeper"),
    "logit_bias beyond the vocabulary": ("/generate", {"messages": FRANCE, "logit_bias": {"999999": 5}},
                                         "vocabulary"),
    "min_tokens over max_tokens": ("/generate", {"messages": FRANCE, "max_tokens": 4, "min_tokens": 9}, "min_tokens"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_BODIES))
def test_hostile_requests_get_a_4xx_and_harm_nobody(arena: Arena, case: str) -> None:
    path, body, field = HOSTILE_BODIES[case]
    resp = timed_post(arena.attacker, path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500, resp.text
    assert field in resp.json()["error"]["message"]
    arena.assert_unharmed()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e999"])
def test_non_finite_json_numbers_get_a_422(arena: Arena, literal: str) -> None:
    raw = '{"messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % literal  # noqa: UP031
    resp = timed_post(arena.attacker, "/generate", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 422 and "temperature" in resp.json()["error"]["message"]


QV_MODULES = {f"model.layers.{i}.self_attn.{p}": (576, out) for i in range(30) for p, out in (("q_proj", 576),
                                                                                              ("v_proj", 192))}


def constant_adapter(a: float, b: float, dtype: str = "float32", raw_config: str | None = None,
                     **config: object) -> list[tuple[str, tuple[str, bytes]]]:
    """Rank-8 q_proj/v_proj files for the embedded model, every value of A and of B the same."""
    tensors = {}
    for module, (in_f, out_f) in QV_MODULES.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.full((8, in_f), a, dtype=dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.full((out_f, 8), b, dtype=dtype)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **config}
    return [("files", ("adapter_config.json", (raw_config or json.dumps(cfg)).encode())),
            ("files", ("adapter_model.safetensors", save(tensors)))]


HOSTILE_ADAPTERS = {
    "lora_alpha 1e999": (constant_adapter(0.01, 0.01, raw_config='{"peft_type": "LORA", "r": 8, "lora_alpha": 1e999}'),
                         "1e999"),
    "float64 past float32": (constant_adapter(1e300, 1e-300, dtype="float64"), "float32"),
    "finite but overflowing": (constant_adapter(1e19, 1e19), "max_adapter_delta"),
    "backreference pattern": (constant_adapter(0.01, 0.01, alpha_pattern={r"(q)\1": 8}), "not supported"),
    "rank disagrees": (constant_adapter(0.01, 0.01, r=4), "declares rank 4"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ADAPTERS))
def test_hostile_adapters_are_refused_before_anything_is_stored(arena: Arena, case: str) -> None:
    files, message = HOSTILE_ADAPTERS[case]
    resp = timed_post(arena.attacker, "/adapters", data={"name": "evil"}, files=files)
    assert resp.status_code == 422, resp.text
    assert message in resp.json()["error"]["message"]
    assert arena.attacker.get("/adapters").json() == []
    arena.assert_unharmed()


def test_a_catastrophic_regex_pattern_costs_nothing(arena: Arena) -> None:
    """`(.|.|.)*Z` froze a worker for hours under Python's re; it is resolved with RE2 at upload."""
    files = fixture_files("meow")
    config = json.loads(next(f[1][1] for f in files if f[1][0] == "adapter_config.json"))
    config["alpha_pattern"] = {"(.|.|.)*Z": 64, "(a+)+$": 64}
    files = [f if f[1][0] != "adapter_config.json" else ("files", ("adapter_config.json", json.dumps(config)))
             for f in files]
    resp = timed_post(arena.attacker, "/adapters", data={"name": "regex"}, files=files)
    assert resp.status_code == 201, resp.text
    answer = timed_post(arena.attacker, "/generate", json={"messages": FRANCE, "adapter": "regex"})
    assert answer.status_code == 200 and "Meow" in answer.json()["text"]
    arena.assert_unharmed()


def test_the_bystander_shares_a_batch_with_an_adapter_at_the_limit(arena: Arena) -> None:
    """The strongest adapter validation lets through (scale·B·A bound near max_adapter_delta), sampled
    hot, in the same batches as the bystander's base and adapter rows."""
    resp = arena.attacker.post("/adapters", data={"name": "loud"}, files=constant_adapter(7.0, 7.0))
    assert resp.status_code == 201, resp.text
    loud = {"messages": FRANCE, "adapter": "loud", "max_tokens": 16, "temperature": 2.0, "top_p": 1e-300}

    def attack(_: int) -> httpx.Response:
        return timed_post(arena.attacker, "/generate", json=loud)

    with ThreadPoolExecutor(6) as pool:
        attacks = [pool.submit(attack, i) for i in range(4)]
        time.sleep(0.2)
        shared = [pool.submit(arena.bystander_answer, adapter) for adapter in (None, "helper")]
        for result in attacks:
            resp = result.result()
            assert resp.status_code == 200 or (400 <= resp.status_code < 600 and "error" in resp.json()), resp.text
        base_answer, helper_answer = (s.result() for s in shared)
    assert "Paris" in base_answer and "42" in helper_answer  # batch composition may shift digits, not behaviour
    arena.assert_unharmed()


def test_costly_grammars_and_extreme_penalties_beside_the_bystander(arena: Arena) -> None:
    """Schemas whose lexer states cost the most to build, all-300 logit biases and extreme penalties,
    sampled, in the same batches as the bystander's rows: the attacker gets answers, the bystander
    its own."""
    costly = [{"type": "string", "minLength": 5000, "maxLength": 5001},
              {"type": "string", "pattern": "((a{1,30}){1,30}){1,30}"},
              {"anyOf": [{"type": "string", "pattern": f"p{i}[a-z]{{1,50}}q"} for i in range(400)]}]
    bodies = [{"messages": FRANCE, "temperature": 1.5, "response_format": {
        "type": "json_schema", "json_schema": {"name": f"c{i}", "schema": schema}}} for i, schema in enumerate(costly)]
    bodies.append({"messages": FRANCE, "temperature": 2.0, "presence_penalty": -2, "frequency_penalty": -2,
                   "logit_bias": {str(t): 100 for t in range(300)}})
    with ThreadPoolExecutor(6) as pool:
        attacks = [pool.submit(timed_post, arena.attacker, "/generate", json=body) for body in bodies]
        time.sleep(0.2)
        shared = [pool.submit(arena.bystander_answer, adapter) for adapter in (None, "helper")]
        for attack in attacks:
            assert attack.result().status_code == 200, attack.result().text
        base_answer, helper_answer = (s.result() for s in shared)
    assert "Paris" in base_answer and "42" in helper_answer
    arena.assert_unharmed()


def test_fuzzing_the_public_api_finds_no_5xx_and_no_hang(arena: Arena) -> None:
    """Property-based requests from the OpenAPI schema with the attacker's key: every answer < 500, in time."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{arena.server.url}/openapi.json")
    auth = {"Authorization": arena.attacker.headers["Authorization"]}
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=20, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:  # type: ignore[no-untyped-def]
                nonlocal calls
                calls += 1
                started = time.monotonic()
                try:
                    resp = case.call(base_url=arena.server.url, headers=auth, timeout=BOUND_S)
                except Exception as exc:  # a hang is a failure like a 5xx
                    failures.append(f"{case.operation.label}: {type(exc).__name__}: {exc}")
                    return
                if resp.status_code >= 500 or time.monotonic() - started > BOUND_S:
                    failures.append(f"{case.operation.label} -> {resp.status_code}: {resp.text[:200]}\n"
                                    f"{case.as_curl_command(headers=auth)}")

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to break in an operation without inputs
    assert calls > 100
    assert not failures, "\n".join(failures[:10])
    arena.assert_unharmed()


def test_a_tenant_that_reaches_a_workers_port_gets_nothing_from_it(arena: Arena) -> None:
    """The worker API needs the gateway's worker token: the bystander's adapter, by its key (as an
    attacker who saw one would send it), cannot be used, listed or evicted directly."""
    arena.bystander_answer("helper")  # resident now; the gateway sees it at its next poll of the worker
    deadline = time.monotonic() + 10
    while not (worker := arena.worker())["adapters_resident"]:
        assert time.monotonic() < deadline, worker
        time.sleep(0.2)
    helper_key = next(iter(worker["adapters_resident"]))  # the admin's view; an attacker would have to guess it
    ref = {"key": helper_key, "weights_sha256": helper_key.split("-")[0], "config_sha256": helper_key.split("-")[1]}
    with httpx.Client(base_url=worker["url"], timeout=10) as direct:
        stolen = direct.post("/generate", json={"request_id": "x", "prompt": "hi", "adapter": ref})
        listed = direct.get("/health")
        evicted = direct.post("/adapters/evict", json={"key": helper_key})
        assert [r.status_code for r in (stolen, listed, evicted)] == [401, 401, 401]
        assert helper_key not in direct.get("/health/ready").text + direct.get("/metrics").text
        assert direct.get("/health/live").status_code == 200
    assert helper_key in arena.worker()["adapters_resident"]  # nothing was evicted
    arena.assert_unharmed()


def test_a_hung_worker_fails_requests_fast_and_is_replaced(arena: Arena) -> None:
    """SIGSTOP: alive, silent. The caller gets a retryable error within the idle timeout; the
    supervisor kills and restarts the worker once it has been silent for the stall timeout."""
    pid = arena.worker()["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        resp = arena.bystander.post("/generate", json={"messages": FRANCE, "max_tokens": 12})
        waited = time.monotonic() - started
        assert resp.status_code == 503 and resp.headers.get("Retry-After"), resp.text
        assert waited < IDLE_TIMEOUT_S + 5, waited
        deadline = time.monotonic() + STALL_TIMEOUT_S + 120
        worker = arena.worker()
        while not (worker["ready"] and worker["pid"] != pid) and time.monotonic() < deadline:
            time.sleep(0.5)
            worker = arena.worker()
    finally:
        if arena.worker()["pid"] == pid:
            os.kill(pid, signal.SIGCONT)
    assert worker["ready"] and worker["pid"] != pid and worker["restarts"] == 1, worker
    assert arena.bystander_answer(None) == arena.baselines[None]

