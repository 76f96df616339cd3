"""Constrained decoding (response_format): JSON answers, or JSON valid against a tenant's schema.

llguidance compiles the schema into a grammar and, at every step, tells which tokens keep the
answer valid; the engine masks the others out of that row's logits before sampling, so each
row of a batch has its own grammar (or none) beside its own adapter.

Where the work happens:
- compiling: on the worker's prompt thread, never the engine's (`Grammars.matcher`), with
  llguidance's fuel limits bounding the work a hostile schema can ask for; a schema that does
  not compile is a 400 that names the problem. Compiled grammars are cached by schema and each
  request gets a copy of the cached matcher (microseconds);
- masking: on the engine thread, per constrained row and step (`allowed_tokens`), bounded by
  the per-step fuel; a row whose grammar runs out of fuel fails alone.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import torch
from llguidance import LLMatcher, LLTokenizer
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

from worker.grammar_spec import GrammarError, grammar_of, parser_limits
from worker.protocol import Constraint

CACHED_GRAMMARS = 256


class Grammars:
    """Compiled response formats, by schema; the tokenizer's llguidance view is built on first use."""

    def __init__(self, tokenizer: Any) -> None:
        self._hf_tokenizer = tokenizer
        self._tokenizer: LLTokenizer | None = None
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes: dict[int, bytes] = {}  # token id -> its bytes, for log probabilities (bounded by the vocabulary)

    def matcher(self, constraint: Constraint) -> LLMatcher:
        """A fresh matcher for one request (prompt thread): raises GrammarError if it cannot compile."""
        key = json.dumps([constraint.type, constraint.json_schema], sort_keys=True)
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template.deep_copy()
        template = self._compile(constraint)
        with self._lock:
            self._compiled[key] = template
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return template.deep_copy()

    def _compile(self, constraint: Constraint) -> LLMatcher:
        tokenizer = self._llg_tokenizer()
        grammar = grammar_of(constraint, tokenizer)
        matcher = LLMatcher(tokenizer, grammar, log_level=0, limits=parser_limits())
        # The first mask here, not on the engine thread: it builds the lexer's first states, and
        # some schemas compile but cannot produce a first token (`{"$ref": "#"}`).
        fill_next_token_bitmask(matcher, allocate_token_bitmask(1, tokenizer.vocab_size), 0)
        if matcher.is_error():
            raise GrammarError(f"response_format: the JSON schema cannot be enforced: {matcher.get_error()[:500]}")
        return matcher

    def allowed(self, matchers: list[LLMatcher], vocab: int, device: torch.device) -> tuple[torch.Tensor, list[str]]:
        """[rows, vocab] True where the row's grammar allows the token next (engine thread), and per
        row the error that stopped its grammar, "" if none (its mask is then all True: the caller
        fails the row rather than sampling it). `vocab`: the logits' width."""
        tokenizer = self._llg_tokenizer()
        bitmask = allocate_token_bitmask(len(matchers), tokenizer.vocab_size)
        errors = []
        for row, matcher in enumerate(matchers):
            fill_next_token_bitmask(matcher, bitmask, row)
            errors.append((matcher.get_error() or "the grammar failed") if matcher.is_error() else "")
            if errors[-1]:
                bitmask[row] = -1
        shifts = torch.arange(32, dtype=torch.int32)
        bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]: token 32*w + b at [w, b]
        allowed = bits.view(len(matchers), -1)[:, :vocab].bool()
        if allowed.shape[1] < vocab:  # the model's vocabulary is padded beyond the tokenizer's: never those
            allowed = torch.cat([allowed, allowed.new_zeros(len(matchers), vocab - allowed.shape[1])], dim=1)
        return allowed.to(device), errors

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a byte-level token can hold half a character)."""
        cached = self._bytes.get(token)
        if cached is None:
            try:
                cached = bytes(self._llg_tokenizer().decode_bytes([token]))
            except GrammarError:  # a slow tokenizer: its decoded text is the best there is
                cached = self._hf_tokenizer.decode([token]).encode()
            self._bytes[token] = cached
        return cached

    def _llg_tokenizer(self) -> LLTokenizer:
        if self._tokenizer is None:
            from llguidance.hf import from_tokenizer

            try:
                self._tokenizer = from_tokenizer(self._hf_tokenizer)
            except ValueError as exc:  # a slow (non-Rust) tokenizer
                raise GrammarError(f"response_format is not available with this model's tokenizer: {exc}") from None
        return self._tokenizer
