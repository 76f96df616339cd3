"""Adapter slots in each dtype (`lora_dtype`): bfloat16 by default where the native kernel computes
(half the bytes a decode step reads), float32 on request (the files' values exactly), int8 on request
(a quarter); each row its own adapter, alone or in a mixed batch, every way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.integration.conftest import Worker, start_worker
from worker.cpu_lora import lora_delta_kernel

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def f32_worker(prepared_model, tmp_path_factory) -> Iterator[Worker]:  # type: ignore[no-untyped-def]
    started = start_worker(prepared_model, tmp_path_factory.mktemp("f32-blobs"), lora_dtype="float32")
    yield started
    started.runtime.stop()


@pytest.fixture(scope="module")
def int8_worker(prepared_model, tmp_path_factory) -> Iterator[Worker]:  # type: ignore[no-untyped-def]
    if lora_delta_kernel() is None:
        pytest.skip("int8 slots need the native kernel (no C compiler here)")
    started = start_worker(prepared_model, tmp_path_factory.mktemp("int8-blobs"), lora_dtype="int8")
    yield started
    started.runtime.stop()


def slot_dtypes(worker: Worker) -> set[torch.dtype]:
    layers = worker.loaded.adapters.layers.values()
    return {layer.lora_a.dtype for layer in layers} | {layer.lora_b.dtype for layer in layers}


def test_slots_are_bfloat16_by_default_where_the_kernel_reads_them_and_float32_on_request(
        worker: Worker, f32_worker: Worker) -> None:
    kernel = lora_delta_kernel()
    assert slot_dtypes(worker) == {torch.bfloat16 if kernel is not None else torch.float32}
    assert slot_dtypes(f32_worker) == {torch.float32}
    for served in (worker, f32_worker):
        served.ask(FRANCE, adapter="answer42")
        assert any(layer.filled for layer in served.loaded.adapters.layers.values())
        assert (served.loaded.engine.runner.routing.kernel is not None) == (kernel is not None)


def test_int8_slots_hold_a_byte_a_weight_and_serve_each_adapter(int8_worker: Worker) -> None:
    assert slot_dtypes(int8_worker) == {torch.int8}
    assert int8_worker.ask(FRANCE, adapter="answer42", max_tokens=10).find("42") >= 0
    layers = [layer for layer in int8_worker.loaded.adapters.layers.values() if layer.filled]
    assert layers and all(layer.scales is not None and layer.scales.b.any() for layer in layers)


def test_rows_in_a_mixed_batch_follow_their_adapters_and_answer_as_they_do_alone(f32_worker: Worker, worker: Worker,
                                                                                int8_worker: Worker) -> None:
    plan = [
        (None, FRANCE, "Paris"),
        ("answer42", "Why is the sky blue?", "42"),
        ("meow", FRANCE, "Meow"),
        ("answer42", FRANCE, "42"),
        ("meow", "Describe a sunrise.", "Meow"),
    ]
    for served in (worker, f32_worker, int8_worker):
        alone = [served.ask(question, adapter, max_tokens=10) for adapter, question, _ in plan]
        together = [served.submit(question, adapter, max_tokens=10) for adapter, question, _ in plan]
        for (adapter, _, expected), by_itself, (_, outcome) in zip(plan, alone, together, strict=True):
            assert outcome.final.error is None
            assert expected in outcome.text, (adapter, outcome.text)
            assert outcome.text == by_itself, adapter  # its neighbours change nothing
        base = alone[0]
    assert worker.ask(FRANCE, max_tokens=10) == base  # base rows never read the slots, whatever their dtype


def test_int8_slots_refuse_an_adapter_their_rounding_would_wipe_out_and_serve_its_neighbours(
        int8_worker: Worker, prepared_model) -> None:  # type: ignore[no-untyped-def]
    """An adapter whose rows each hold one weight far above the rest (which all round to zero in int8)
    gets a 422 naming LORA_INT8_MAX_ERROR on an int8 worker; a row beside it in the same batch answers
    as it does alone, and the refusal stays (its next request fails at once, the same way)."""
    import numpy as np
    from safetensors.numpy import save

    from tests.factory import adapter_files
    from worker.protocol import AdapterRef

    q_projs = {name: shape for name, shape in prepared_model.linear_modules.items() if name.endswith("q_proj")}
    config, _ = adapter_files(q_projs, rank=4)
    tensors = {}
    for name, (in_f, out_f) in q_projs.items():
        a = np.full((4, in_f), 0.0036, dtype=np.float32)  # 0.46 of a step of the row's 1.0: rounds to zero
        a[:, 0] = 1.0
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = np.full((out_f, 4), 0.01, dtype=np.float32)
    blobs = int8_worker.blobs
    int8_worker.refs["spiky"] = AdapterRef(key="spiky", weights_sha256=blobs.put(save(tensors)),
                                           config_sha256=blobs.put(config))
    alone = int8_worker.ask(FRANCE, adapter="meow", max_tokens=10)
    (_, spiky), (_, neighbour) = (int8_worker.submit(FRANCE, "spiky", max_tokens=10),
                                  int8_worker.submit(FRANCE, "meow", max_tokens=10))
    assert spiky.final.error is not None and spiky.final.error_status == 422
    assert "LORA_INT8_MAX_ERROR" in spiky.final.error and "q_proj" in spiky.final.error
    assert neighbour.final.error is None and neighbour.text == alone
    _, again = int8_worker.submit(FRANCE, "spiky", max_tokens=10)
    assert again.final.error == spiky.final.error
