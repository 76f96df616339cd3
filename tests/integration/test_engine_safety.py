"""The engine thread never dies of a request, and no row's adapter changes another row's values.

Adapters here are written straight into the blob store, past upload validation: the worker
must hold up on its own (an adapter stored before a check existed, a caller that reached the
worker directly).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace

import numpy as np
import pytest
from safetensors.numpy import save

from tests.integration.conftest import Outcome, Worker, worker_request
from worker.protocol import AdapterRef, GenerateRequest, SamplingParams

FRANCE = "What is the capital of France?"


def store_adapter(worker: Worker, name: str, a_value: float, b_value: float, alpha: float = 16) -> AdapterRef:
    """A rank-8 q_proj/v_proj adapter filled with constants, stored as-is."""
    modules = {n: shape for n, shape in _linear_shapes(worker).items() if n.endswith(("q_proj", "v_proj"))}
    tensors = {}
    for module, (in_f, out_f) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.full((8, in_f), a_value, dtype=np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.full((out_f, 8), b_value, dtype=np.float32)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"]}
    weights = worker.blobs.put(save(tensors))
    config_sha = worker.blobs.put(json.dumps(config).encode())
    ref = AdapterRef(key=f"{name}-{uuid.uuid4().hex[:8]}", weights_sha256=weights, config_sha256=config_sha)
    worker.refs[name] = ref
    return ref


def _linear_shapes(worker: Worker) -> dict[str, tuple[int, int]]:
    layers = worker.loaded.adapters.layers
    return {name: (layer.lora_a.shape[2], layer.out_features) for name, layer in layers.items()}


def submit_together(worker: Worker, requests: list[GenerateRequest]) -> list[Outcome]:
    """Hand requests to the engine in one go, so one step takes them all into one prefill pass."""
    outcomes = [Outcome() for _ in requests]
    ids = [worker.loaded.prompts.encode(r) for r in requests]
    engine = worker.loaded.engine
    # Internal on purpose: `submit` one by one may let a step start between two of them.
    from worker.sequence import Sequence

    engine._inbox.extend(Sequence(request=r, sink=o.sink, prompt_ids=i)
                         for r, o, i in zip(requests, outcomes, ids, strict=True))
    engine.wake()
    return outcomes


def request(question: str, adapter: AdapterRef | None = None, **sampling: object) -> GenerateRequest:
    return worker_request(question, adapter, **sampling)


@pytest.mark.parametrize("value", [1e20, 3e30])
def test_base_rows_are_bit_identical_beside_an_adapter_that_overflows(worker: Worker, value: float) -> None:
    """inf x 0 = NaN: base rows beside exactly one adapter used to be masked by multiplying."""
    benign = store_adapter(worker, "benign", 0.0, 0.0)
    poison = store_adapter(worker, "poison", value, value)  # finite weights; B·A·x overflows float32
    worker.ask(FRANCE, adapter="benign", max_tokens=1)  # both resident, so both runs batch alike
    assert worker.submit(FRANCE, adapter="poison", max_tokens=1)[1].final.error_status == 422
    texts = []
    for adapter in (benign, poison):
        bystander, row = submit_together(worker, [request(FRANCE, max_tokens=12),
                                                  request(FRANCE, adapter, max_tokens=1)])
        assert bystander.final.error is None
        texts.append(bystander.text)
        if adapter is poison:
            assert row.final.error_status == 422 and "non-finite" in (row.final.error or "")
    assert texts[0] == texts[1] and "Paris" in texts[0]


def test_an_adapter_whose_scaled_weights_overflow_is_refused_at_load(worker: Worker) -> None:
    store_adapter(worker, "overflow", 1.0, 3e38, alpha=64)  # B * (64 / 8) is inf in float32 (and bfloat16)
    _, outcome = worker.submit(FRANCE, adapter="overflow")
    dtype = str(worker.loaded.adapters.dtype).removeprefix("torch.")  # the slots' (LORA_DTYPE)
    assert outcome.final.error_status == 422 and f"not finite in {dtype}" in (outcome.final.error or "")
    assert "Paris" in worker.ask(FRANCE)
    assert worker.loaded.adapters.resident().count(worker.refs["overflow"].key) == 0  # its slot was emptied


def unchecked(**sampling: object) -> SamplingParams:
    """Sampling parameters as a caller that skipped validation would send them."""
    return SamplingParams.model_construct(**{**SamplingParams().model_dump(), "max_tokens": 8, **sampling})


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0.7, "seed": 2**64}, {"temperature": 5e-324}, {"temperature": float("nan")},
     {"temperature": 1.0, "top_p": float("nan")}],
)
def test_bad_sampling_fails_its_own_request_and_not_the_pass_it_shares(worker: Worker, sampling: dict) -> None:  # type: ignore[type-arg]
    hostile = GenerateRequest(request_id=uuid.uuid4().hex, messages=request(FRANCE).messages,
                              sampling=unchecked(**sampling))
    attacker, bystander = submit_together(worker, [hostile, request(FRANCE, max_tokens=12)])
    final = attacker.final  # a clean error, or (NaN compares false: greedy, no nucleus cut) an answer
    assert final.error_status in (400, 500) if final.finish_reason == "error" else final.error is None
    assert bystander.final.error is None and "Paris" in bystander.text
    assert worker.runtime.liveness_problem() is None
    assert "Paris" in worker.ask(FRANCE)


def test_an_unforeseen_error_fails_the_batch_and_the_engine_goes_on(worker: Worker, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine = worker.loaded.engine
    _, long_one = worker.submit("Count to one hundred.", max_tokens=200, ignore_eos=True)
    long_one.first_event_at()
    calls = {"n": 0}
    collect = engine.adapters.collect

    def broken_once() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug nobody foresaw")
        collect()

    monkeypatch.setattr(engine.adapters, "collect", broken_once)
    final = long_one.final
    assert final.finish_reason == "error" and "internal error in the engine" in (final.error or "")
    assert "Paris" in worker.ask(FRANCE)
    assert worker.runtime.liveness_problem() is None and engine.death is None


def test_a_stalled_engine_is_reported_not_live(worker: Worker, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    engine, runtime = worker.loaded.engine, worker.runtime
    monkeypatch.setattr(runtime, "config", replace(runtime.config, stall_timeout_s=0.5, keepalive_s=0.1))
    step = engine.step

    def slow_step() -> None:
        time.sleep(1.5)  # a forward pass that hangs
        step()

    monkeypatch.setattr(engine, "step", slow_step)
    problems = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not problems:
        if (problem := runtime.liveness_problem()) is not None:
            problems.append(problem)
        time.sleep(0.05)
    monkeypatch.setattr(engine, "step", step)
    assert problems and "no step" in problems[0]
    health = runtime.health()
    deadline = time.monotonic() + 5
    while not health.ready and time.monotonic() < deadline:
        time.sleep(0.1)
        health = runtime.health()
    assert health.ready and health.live  # it came back: a slow step is not a death sentence


def test_a_tenant_flooding_the_queue_does_not_hold_up_another_tenants_request(worker: Worker) -> None:
    """16 requests from one tenant, then one from another, all queued at once on an 8-row engine:
    first come, first served put the lone one behind two full rounds of the flood."""
    def from_tenant(tenant: str) -> GenerateRequest:
        return request(FRANCE, max_tokens=6, ignore_eos=True).model_copy(update={"tenant": tenant})

    flood = [from_tenant("flood") for _ in range(16)]
    outcomes = submit_together(worker, [*flood, from_tenant("lone")])
    queued = [o.final.queue_seconds for o in outcomes]
    assert all(o.final.error is None for o in outcomes) and None not in queued
    lone, flood_queued = queued[-1], sorted(queued[:-1])  # type: ignore[type-var]
    assert lone <= flood_queued[7], (lone, flood_queued)  # admitted in the first round of 8
