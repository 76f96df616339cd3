"""Incremental detokenization with the served model's own tokenizer: the pieces add up to what
decoding the whole output gives, for any token sequence a model may produce."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from worker.detokenize import IncrementalDecoder

TEXTS = [
    "The capital of France is Paris.",
    "Ünïcödé: naïve café, 東京タワー, Ελληνικά, emoji 🦜🚀 and a flag 🇫🇷!",
    "code:\n    def f(x):\n        return x ** 2  # two spaces  and\ttabs\n",
    "  leading spaces, trailing spaces   ",
]


@pytest.fixture(scope="module")
def tokenizer(prepared_model):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(prepared_model.path)


def pieces(tokenizer, ids: list[int]) -> list[str]:  # type: ignore[no-untyped-def]
    decoder = IncrementalDecoder(tokenizer)
    out = [decoder.push(token) for token in ids]
    out.append(decoder.finish())
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_of_real_text_add_up_to_the_whole(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text)["input_ids"]
    parts = pieces(tokenizer, ids)
    assert "".join(parts) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any(part.endswith("\ufffd") for part in parts)  # half characters are held back


def test_random_tokens_and_special_tokens_add_up_to_the_whole(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    specials = list(tokenizer.all_special_ids)
    for _ in range(30):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        ids[rng.randrange(len(ids))] = rng.choice(specials)
        assert "".join(pieces(tokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_a_character_cut_off_at_the_end_still_comes_out(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer("🦜")["input_ids"]
    assert len(ids) > 1  # byte-level: the parrot's four bytes span tokens
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.push(ids[0]) == ""
    assert decoder.finish() == tokenizer.decode(ids[:1])  # the row ended there: what it made is sent
