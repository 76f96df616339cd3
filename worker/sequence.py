"""One request as the engine runs it: tokens so far, text emitted, how it ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.detokenize import IncrementalDecoder
from worker.protocol import FinishReason, GenerateEvent, GenerateRequest, PromptLogprob, TokenLogprob, Usage

EventSink = Callable[[GenerateEvent], None]


@dataclass
class Sequence:
    request: GenerateRequest
    sink: EventSink
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None  # adapter slot while running; None for the base model
    region: int | None = None  # start of its KV region in the pool while running
    cached: int = 0  # positions whose keys and values are in its region
    generator: torch.Generator | None = None
    decoder: IncrementalDecoder | None = None  # set by the engine when it takes the request
    matcher: Any = None  # llguidance LLMatcher of its response_format: which tokens may come next
    logprobs: list[TokenLogprob] = field(default_factory=list)  # asked for, not sent yet
    text: str = ""
    emitted: int = 0  # characters of `text` already sent
    finish_reason: FinishReason | None = None
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    # n > 1: choice `index` of the request. Choice 0 prefills the prompt; the others (its `siblings`)
    # are admitted with it and start from a copy of its prompt's keys and values (`follows` until then).
    index: int = 0
    first: Sequence | None = None  # choice 0, for the other choices
    siblings: list[Sequence] = field(default_factory=list)  # choice 0's: choices 1 to n-1
    cumulative_logprob: float = 0.0  # of the tokens chosen, when `score` was asked
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)  # when asked: filled as chunks are prefilled
    prompt_logprobs_sent: bool = False

    @property
    def tenant(self) -> str:
        return self.request.tenant or ""

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prefilled(self) -> bool:
        """Its whole prompt is in the cache: from now on it feeds one token per step."""
        return self.cached >= len(self.prompt_ids)

    @property
    def follows(self) -> bool:
        """A later choice still waiting for choice 0's prompt: it is never prefilled on its own."""
        return self.first is not None and not self.prefilled

    @property
    def scores_prompt(self) -> bool:
        """Its prompt's log probabilities were asked for (echo): its prompt chunks keep every position's logits."""
        return self.request.sampling.prompt_logprobs is not None

    @property
    def reserved_tokens(self) -> int:
        """KV cache positions this row may come to hold."""
        return len(self.prompt_ids) + self.request.sampling.max_tokens

    def append_text(self, delta: str) -> None:
        """Take newly decoded text; cut the output at the earliest stop sequence and finish there.

        Only the new tail is searched (with room for a stop that began in earlier text), so the
        check costs the same at the thousandth token as at the first.
        """
        stops = self.request.sampling.stop
        if not delta:
            return
        start = max(0, len(self.text) - max((len(stop) for stop in stops), default=1) + 1)
        self.text += delta
        cuts = [at for stop in stops if (at := self.text.find(stop, start)) != -1]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.finish_reason = "stop"

    def flush(self) -> None:
        """Send the text that can no longer change, or all of it once finished."""
        end = len(self.text)
        if self.finish_reason is None:
            # Hold back a possible stop-sequence prefix and a half-decoded character.
            end -= max((len(s) for s in self.request.sampling.stop), default=1) - 1
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        if end > self.emitted:
            progress = Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.output_ids))
            self.sink(GenerateEvent(request_id=self.request_id, index=self.index, text=self.text[self.emitted : end],
                                    progress=progress, logprobs=self._sent_logprobs(),
                                    prompt_logprobs=self._sent_prompt_logprobs()))
            self.emitted = end
        if self.finish_reason is not None:
            self.sink(
                GenerateEvent(
                    request_id=self.request_id,
                    index=self.index,
                    finished=True,
                    finish_reason=self.finish_reason,
                    usage=Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.output_ids)),
                    queue_seconds=None if self.admitted is None else self.admitted - self.arrived,
                    logprobs=self._sent_logprobs(),
                    cumulative_logprob=self.cumulative_logprob if self.request.sampling.score else None,
                    prompt_logprobs=self._sent_prompt_logprobs(),
                )
            )

    def _sent_logprobs(self) -> list[TokenLogprob] | None:
        """The log probabilities not sent yet, for the event going out (None if none were asked)."""
        if self.request.sampling.logprobs is None:
            return None
        pending, self.logprobs = self.logprobs, []
        return pending

    def _sent_prompt_logprobs(self) -> list[PromptLogprob] | None:
        """The prompt's log probabilities with the choice's first event only (None if not asked)."""
        if not self.scores_prompt or self.prompt_logprobs_sent:
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs

    def fail(self, message: str, status: int = 500) -> None:
        self.finish_reason = "error"
        self.sink(
            GenerateEvent(
                request_id=self.request_id,
                index=self.index,
                finished=True,
                finish_reason="error",
                error=message,
                error_status=status,
                usage=Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.output_ids)),
            )
        )
