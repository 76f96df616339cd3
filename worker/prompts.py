"""Turning a request's prompt or chat messages into token ids, off the engine thread.

Chat templating and tokenization cost time in proportion to the request's size; done on
the engine thread they would stall every running row, so the worker's API runs them on a
thread of their own before a request reaches the engine, and refuses what cannot run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from llguidance import LLMatcher

from worker.grammar import Grammars
from worker.grammar_spec import GrammarError
from worker.protocol import GenerateRequest


class PromptError(ValueError):
    """The request's prompt cannot run on this worker; the message says why (a 400)."""


@dataclass(frozen=True)
class PromptLimits:
    max_context: int  # prompt + max_tokens, the model's context
    kv_cache_tokens: int  # the worker's whole KV budget: one request (all its choices) must fit it alone
    max_batch_size: int = 1 << 30  # rows of the worker's batch: a request's n choices run in it at once


@dataclass(frozen=True)
class PreparedPrompt:
    ids: list[int]
    matcher: LLMatcher | None  # the response_format's grammar, in its start state


class PromptEncoder:
    def __init__(self, tokenizer: Any, limits: PromptLimits, grammars: Grammars) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.grammars = grammars

    def prepare(self, request: GenerateRequest) -> PreparedPrompt:
        """Token ids and, for a response_format, its compiled grammar; PromptError if either cannot be."""
        ids = self.encode(request)
        vocab = len(self.tokenizer)
        beyond = sorted(t for t in request.sampling.token_ids() if t >= vocab)
        if beyond:
            raise PromptError(f"token id {beyond[0]} (logit_bias or stop_token_ids) is not in the model's "
                              f"vocabulary of {vocab} tokens (0-{vocab - 1})")
        constraint = request.sampling.constraint
        if request.sampling.logprobs is not None or request.sampling.prompt_logprobs is not None:
            self.grammars.token_bytes(0)  # the tokenizer's byte view is built here, not on the engine thread
        try:
            matcher = None if constraint is None else self.grammars.matcher(constraint)
        except GrammarError as exc:
            raise PromptError(str(exc)) from None
        return PreparedPrompt(ids, matcher)

    def encode(self, request: GenerateRequest) -> list[int]:
        """Token ids of the request's prompt, checked against the context and the KV budget."""
        try:
            ids = self._ids(request)
        except (ValueError, TypeError, UnicodeError, TemplateError) as exc:
            raise PromptError(f"the prompt could not be tokenized: {exc}") from exc
        if not ids:
            raise PromptError("the prompt is empty")
        wanted = len(ids) + request.sampling.max_tokens
        if wanted > self.limits.max_context:
            raise PromptError(
                f"the prompt has {len(ids)} tokens; with max_tokens={request.sampling.max_tokens} "
                f"that exceeds the model's context of {self.limits.max_context} tokens"
            )
        n = request.sampling.n
        if n > self.limits.max_batch_size:
            raise PromptError(f"n={n} choices run as {n} batch rows at once; this worker's batch has "
                              f"{self.limits.max_batch_size} (max_batch_size)")
        if n * wanted > self.limits.kv_cache_tokens:
            times = f"{n} choices of " if n > 1 else ""
            raise PromptError(
                f"{times}the prompt ({len(ids)} tokens) plus max_tokens ({request.sampling.max_tokens}) needs more "
                f"KV cache than the worker's budget of {self.limits.kv_cache_tokens} tokens (kv_cache_mb)"
            )
        return ids

    def _ids(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            chat = [m.model_dump() for m in request.messages]
            text = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False).input_ids)
        return list(self.tokenizer(request.prompt or "").input_ids)
