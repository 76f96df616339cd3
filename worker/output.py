"""Output processing: a pass's logits become each row's next token, text, and how it ends.

Sampling is batched (`worker.sampling`); what follows is per row and never fails another row:
a row whose logits are non-finite, or whose token cannot be decoded, fails alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from worker import metrics
from worker.grammar import Grammars
from worker.logits import processing
from worker.protocol import PromptLogprob, TokenLogprob, TopLogprob
from worker.runner import PromptScores
from worker.sampling import RowFailure, choose_tokens
from worker.sequence import Sequence

log = logging.getLogger(__name__)
T = TypeVar("T", TopLogprob, TokenLogprob, PromptLogprob)


class OutputProcessor:
    def __init__(self, eos_ids: set[int], charge: Callable[[str, int], None], grammars: Grammars) -> None:
        self.eos_ids = eos_ids
        self.charge = charge  # the fair scheduler's counter: one per generated token
        self.grammars = grammars  # response_format: the next tokens each constrained row may take

    def score_prompts(self, scores: list[PromptScores]) -> None:
        """Prompt tokens' log probabilities, from the logits of the positions before them (echo)."""
        for score in scores:
            seq, width = score.seq, score.seq.request.sampling.prompt_logprobs or 0
            logprobs = torch.log_softmax(score.logits.float(), dim=-1)
            picked = logprobs.gather(1, torch.tensor(score.targets, device=logprobs.device).unsqueeze(1))
            top_values, top_ids = (t.tolist() for t in logprobs.topk(width, dim=-1)) if width else ([], [])
            self._open_prompt_scores(seq)
            for j, (token, value) in enumerate(zip(score.targets, picked.view(-1).tolist(), strict=True)):
                top = [self._entry(TopLogprob, t, v) for t, v in zip(top_ids[j], top_values[j], strict=True)] \
                    if width else []
                seq.prompt_logprobs.append(self._entry(PromptLogprob, token, value, top=top))

    def _open_prompt_scores(self, seq: Sequence) -> None:
        """The prompt's first token: nothing before it, so no log probability. A later choice shares choice 0's."""
        if seq.prompt_logprobs or not seq.scores_prompt:
            return
        if seq.first is not None:
            seq.prompt_logprobs = list(seq.first.prompt_logprobs)
            return
        raw = self.grammars.token_bytes(seq.prompt_ids[0])
        seq.prompt_logprobs.append(PromptLogprob(token=raw.decode(errors="replace"), logprob=None, bytes=list(raw)))

    def settle(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Choose each row's next token from logits [rows, vocab]; a row that cannot go on fails alone."""
        for seq in rows:
            self._open_prompt_scores(seq)
        if any(seq.request.sampling.max_tokens == 0 for seq in rows):
            rows, logits = self._finish_prompt_only(rows, logits)
            if not rows:
                return
        adjust, grammar_failed = processing(rows, self.eos_ids, self.grammars, logits.shape[-1], logits.device)
        asking = [i for i, seq in enumerate(rows)
                  if seq.request.sampling.logprobs is not None or seq.request.sampling.score]
        # Of the model's own distribution: before penalties, biases and masks change the logits.
        logprobs = torch.log_softmax(logits.index_select(0, torch.tensor(asking, device=logits.device)).float(),
                                     dim=-1) if asking else None
        tokens = choose_tokens(logits, [s.request.sampling for s in rows], [s.generator for s in rows], adjust)
        if logprobs is not None:
            self._record_logprobs([rows[i] for i in asking], [tokens[i] for i in asking], logprobs)
        for i, (seq, token) in enumerate(zip(rows, tokens, strict=True)):
            if seq.finish_reason is not None:
                continue  # aborted while the step ran
            if i in grammar_failed:
                seq.fail(f"response_format: the answer's grammar cannot go on: {grammar_failed[i][:300]}")
                continue
            if isinstance(token, RowFailure):
                self._fail(seq, token)
                continue
            try:
                self._accept(seq, token)
            except Exception as exc:
                log.exception("request %s failed after its forward pass", seq.request_id)
                seq.fail(f"generation failed: {type(exc).__name__}")

    def _finish_prompt_only(self, rows: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """Rows that asked for no tokens (max_tokens 0: the prompt's log probabilities) end here; the rest go on."""
        for seq in rows:
            if seq.request.sampling.max_tokens == 0 and seq.finish_reason is None:
                seq.finish_reason = "length"
                seq.flush()
        keep = [i for i, seq in enumerate(rows) if seq.request.sampling.max_tokens > 0]
        return [rows[i] for i in keep], logits[keep]

    def _record_logprobs(self, rows: list[Sequence], tokens: list[int | RowFailure], logprobs: torch.Tensor) -> None:
        """Each row's chosen token's log probability and its top alternatives, kept for its next event;
        rows that asked for a score add it to their total."""
        chosen = [token if isinstance(token, int) else 0 for token in tokens]
        picked = logprobs.gather(1, torch.tensor(chosen, device=logprobs.device).unsqueeze(1)).view(-1).tolist()
        widest = max(seq.request.sampling.logprobs or 0 for seq in rows)
        top_values, top_ids = (t.tolist() for t in logprobs.topk(widest, dim=-1)) if widest else ([], [])
        for j, (seq, token) in enumerate(zip(rows, tokens, strict=True)):
            if not isinstance(token, int):
                continue
            seq.cumulative_logprob += max(picked[j], -9999.0)  # finite, like the reported entries
            if seq.request.sampling.logprobs is None:
                continue
            width = seq.request.sampling.logprobs or 0
            top = [self._entry(TopLogprob, t, v) for t, v in zip(top_ids[j][:width], top_values[j][:width],
                                                                    strict=True)] if width else []
            seq.logprobs.append(self._entry(TokenLogprob, token, picked[j], top=top))

    def _entry(self, kind: type[T], token: int, logprob: float, **more: Any) -> T:
        raw = self.grammars.token_bytes(token)
        # -inf (a token the model rules out) is no JSON number: OpenAI's floor for "impossible" instead.
        return kind(token=raw.decode(errors="replace"), logprob=max(logprob, -9999.0), bytes=list(raw), **more)

    def _fail(self, seq: Sequence, failure: RowFailure) -> None:
        if failure.non_finite and seq.request.adapter is not None:
            # Rows are computed independently, so the values came from this row's adapter.
            seq.fail("the adapter produced non-finite values (NaN or Inf); it cannot serve this prompt", 422)
        else:
            seq.fail(f"generation failed: {failure.message}", failure.status)

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.output_ids.append(token)
        self.charge(seq.tenant, 1)
        metrics.GENERATED_TOKENS.inc()
        params = seq.request.sampling
        complete = False  # the answer's grammar is satisfied and allows nothing more
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
            if seq.matcher.is_error():
                seq.fail(f"response_format: the answer's grammar cannot go on: {seq.matcher.get_error()[:300]}")
                return
            complete = seq.matcher.is_stopped()
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids or complete:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= params.max_tokens:
            seq.finish_reason = "length"
        assert seq.decoder is not None  # set when the engine takes the request
        delta = seq.decoder.push(token)
        if seq.finish_reason is not None:
            delta += seq.decoder.finish()
        seq.append_text(delta)
        seq.flush()


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token that ends a generation: the model's generation config and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
