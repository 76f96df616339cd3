"""A fine-tuning job's files tokenized with the served model's own tokenizer, and the bounds on them."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.unit.test_finetune_files import jsonl
from worker.finetune import Refused, load_examples


@pytest.fixture(scope="module")
def tokenizer(prepared_model):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(prepared_model.path)


def test_a_validation_file_over_its_token_bound_is_refused_naming_the_setting(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "validation.jsonl"
    path.write_bytes(jsonl(50))
    rows = load_examples(str(path), "validation", 1000, tokenizer, 2048)
    total = sum(len(ids) for ids, _ in rows)
    assert len(rows) == 50 and all(any(label != -100 for label in labels) for _, labels in rows)
    assert load_examples(str(path), "validation", 1000, tokenizer, 2048, (total, "the_setting")) == rows
    with pytest.raises(Refused) as refused:
        load_examples(str(path), "validation", 1000, tokenizer, 2048, (total - 1, "the_setting"))
    assert refused.value.code == "invalid_file"
    assert f"over {total - 1} tokens by example 50" in str(refused.value) and "the_setting" in str(refused.value)


def test_an_example_over_the_token_limit_is_refused_naming_it(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "training.jsonl"
    path.write_bytes(jsonl(3, answer="word " * 300))
    with pytest.raises(Refused, match=r"training file example 1: \d+ tokens, over the limit of 64"):
        load_examples(str(path), "training", 1000, tokenizer, 64)
