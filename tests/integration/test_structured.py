"""response_format on the embedded model: constrained rows beside free rows and other adapters."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.integration.conftest import Worker
from tests.integration.test_engine import wait_idle
from worker.prompts import PromptError
from worker.protocol import Constraint

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                   "city": {"enum": ["Paris", "London", "Rome"]}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ASK_PERSON = "Describe a fictional person as JSON with their name, age and city."


def schema(value: dict) -> Constraint:  # type: ignore[type-arg]
    return Constraint(type="json_schema", json_schema=value)


def test_constrained_rows_are_valid_json_beside_adapters_and_free_rows(worker: Worker) -> None:
    worker.ask("Hi", adapter="answer42", max_tokens=2)  # resident, so every row shares the same passes
    free_alone = worker.ask("What is the capital of France?", max_tokens=12)
    submitted = {
        "adapter+schema": worker.submit(ASK_PERSON, "answer42", max_tokens=60, constraint=schema(PERSON)),
        "base+schema": worker.submit(ASK_PERSON, None, max_tokens=60, constraint=schema(PERSON)),
        "sampled+schema": worker.submit(ASK_PERSON, None, max_tokens=60, temperature=0.9, seed=3,
                                        constraint=schema(PERSON)),
        "object": worker.submit("What is the capital of France? Answer as JSON with the key capital.", None,
                                max_tokens=40, constraint=Constraint(type="json_object")),
        "free": worker.submit("What is the capital of France?", None, max_tokens=12),
        "adapter": worker.submit("Why is the sky blue?", "answer42", max_tokens=8),
    }
    out = {name: outcome for name, (_, outcome) in submitted.items()}
    for name in ("adapter+schema", "base+schema", "sampled+schema"):
        assert out[name].final.finish_reason == "stop", (name, out[name].text)
        jsonschema.validate(json.loads(out[name].text), PERSON)
    assert out["object"].final.finish_reason == "stop", out["object"].text
    assert isinstance(json.loads(out["object"].text), dict)
    assert out["free"].text == free_alone  # a constrained neighbour changes nothing for the others
    assert "42" in out["adapter"].text


def test_a_grammar_the_answer_cannot_finish_in_max_tokens_ends_by_length(worker: Worker) -> None:
    _, outcome = worker.submit(ASK_PERSON, max_tokens=5, constraint=schema(PERSON))
    assert outcome.final.finish_reason == "length"
    assert outcome.text.startswith("{")


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ({"type": "nonsense"}, "nonsense"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),
        ({"$ref": "#/$defs/missing"}, "missing"),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "incompatible types"),
        ({"type": "string", "maxLength": 10**15}, "decimal"),
        ({"$ref": "#"}, "cannot be enforced"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_refused_before_the_engine(worker: Worker, bad: dict, named: str) -> None:  # type: ignore[type-arg]
    wait_idle(worker)  # an earlier test's row leaves the batch just after its last event
    _, outcome = worker.submit(ASK_PERSON, max_tokens=5, constraint=schema(bad))
    assert outcome.final.error_status == 400
    assert named in (outcome.final.error or "")
    assert worker.loaded.engine.stats() == (0, 0)


def test_prepare_refuses_a_bad_schema_with_a_prompt_error(worker: Worker) -> None:
    from tests.integration.conftest import worker_request

    with pytest.raises(PromptError, match="response_format"):
        worker.loaded.prompts.prepare(worker_request("x", constraint=schema({"type": "nonsense"})))
